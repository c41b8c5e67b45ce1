// What the library was compiled for, so that Python can report it (resnext_jax/cpu/build.py).
#include "vec.h"

extern "C" const char* ResnextJaxIsa() { return RESNEXT_JAX_ISA; }
extern "C" int ResnextJaxLanes() { return resnext_jax::kLanes; }
