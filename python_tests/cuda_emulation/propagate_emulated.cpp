#include "../../csrc/cuda/propagate.cu"
