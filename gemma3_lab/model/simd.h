/* The few vector operations step.c uses, in VL float32 lanes: AVX-512 (16 lanes, masked
 * loads) by default, AVX2 with FMA (8 lanes) where STEP_AVX2 is defined (step_avx2.c), so
 * that one source gives the native step for both kinds of CPU. */
#ifndef GEMMA3_LAB_SIMD_H
#define GEMMA3_LAB_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#ifdef STEP_AVX2
#define ISA __attribute__((target("avx2,fma")))
#define VL 8
#define STEP_NAME(name) name##_avx2
typedef __m256 vf;
typedef __m256i vmask;
#define v_zero _mm256_setzero_ps
#define v_set1 _mm256_set1_ps
#define v_loadu _mm256_loadu_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_div _mm256_div_ps
#define v_max _mm256_max_ps
#define v_min _mm256_min_ps
#define v_fmadd _mm256_fmadd_ps
#define v_fnmadd _mm256_fnmadd_ps
ISA static inline vmask v_lanes(int64_t left) {  /* the first min(left, VL) lanes */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(left > VL ? VL : (int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define v_maskload(m, p) _mm256_maskload_ps((p), (m))
#define v_maskstore(p, m, v) _mm256_maskstore_ps((p), (m), (v))
#define v_keep(m, v) _mm256_and_ps((v), _mm256_castsi256_ps(m))
ISA static inline float v_reduce(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#define v_round(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
ISA static inline vf v_two_to(vf n) {  /* 2^n for integer n in [-252, 254], as two exponent fields */
    __m256i e = _mm256_cvtps_epi32(n), a = _mm256_srai_epi32(e, 1), b = _mm256_sub_epi32(e, a);
    __m256 fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(127)), 23));
    __m256 fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(fa, fb);
}
#define v_scale(p, n) _mm256_mul_ps((p), v_two_to(n))
/* VL codes from VL bytes, as float32: signed (int8) or one nibble of unsigned bytes */
#define v_i8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define v_u8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define v_low_nibble(b) _mm256_cvtepi32_ps(_mm256_and_si256((b), _mm256_set1_epi32(15)))
#define v_high_nibble(b) _mm256_cvtepi32_ps(_mm256_srli_epi32((b), 4))
ISA static inline vf v_load_bf16(const uint16_t *p, vmask m) {  /* bfloat16 lanes, zero past the mask */
    uint16_t tail[VL] = {0};
    if (_mm256_movemask_ps(_mm256_castsi256_ps(m)) != 0xff) {  /* a ragged end: read no further than it */
        for (int i = 0; i < VL && ((int *)&m)[i]; i++) tail[i] = p[i];
        p = tail;
    }
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#else
#define ISA __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define VL 16
#define STEP_NAME(name) name
typedef __m512 vf;
typedef __mmask16 vmask;
#define v_zero _mm512_setzero_ps
#define v_set1 _mm512_set1_ps
#define v_loadu _mm512_loadu_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_div _mm512_div_ps
#define v_max _mm512_max_ps
#define v_min _mm512_min_ps
#define v_fmadd _mm512_fmadd_ps
#define v_fnmadd _mm512_fnmadd_ps
static inline vmask v_lanes(int64_t left) { return left >= VL ? (vmask)0xffff : (vmask)((1u << left) - 1); }
#define v_maskload(m, p) _mm512_maskz_loadu_ps((m), (p))
#define v_maskstore(p, m, v) _mm512_mask_storeu_ps((p), (m), (v))
#define v_keep(m, v) _mm512_maskz_mov_ps((m), (v))
#define v_reduce _mm512_reduce_add_ps
#define v_round(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_scale(p, n) _mm512_scalef_ps((p), (n))
#define v_i8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define v_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define v_low_nibble(b) _mm512_cvtepi32_ps(_mm512_and_si512((b), _mm512_set1_epi32(15)))
#define v_high_nibble(b) _mm512_cvtepi32_ps(_mm512_srli_epi32((b), 4))
ISA static inline vf v_load_bf16(const uint16_t *p, vmask m) {
    __m256i b = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#endif

#endif
