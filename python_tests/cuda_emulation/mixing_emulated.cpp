#include "../../csrc/cuda/mixing.cu"
