#include "../../csrc/cuda/plasticity.cu"
