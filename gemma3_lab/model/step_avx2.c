/* step.c again for CPUs with AVX2 and FMA but not AVX-512: the same step in 8 lanes, its
 * functions named with _avx2 (simd.h), its products through gemv.c's AVX2 loops (float32, and bfloat16 widened to float32). */
#define STEP_AVX2 1
#include "step.c"
