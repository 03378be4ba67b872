/* One row times a weight, for decode steps: bfloat16 on CPUs with AVX512-BF16, float32 on
 * CPUs with AVX-512 (built and loaded by gemv.py; why they exist is written there).
 *
 * y[n] = sum_k x[k] * W[n, k] for W (N, K) row-major, x (K), y (N). Each output is one
 * thread's dot product in a fixed order (16 lanes, summed across lanes at the row's end), so
 * its bits depend neither on the thread count nor on which block the row falls in. Several
 * rows share each load of x, and the row AHEAD rows on is prefetched into L2. No -m flags
 * for the whole file: each function names its own instructions (`target`), so a CPU with
 * AVX-512 but no BF16 loads the library and calls only the float32 loop.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
/* How the N weight rows are shared over the threads, for both loops: blocks of R rows, split
 * statically, the last N % R rows after them; ROWS_AT(n0, r) computes rows n0..n0+r-1. Threads
 * only where there is enough to share (a tiny test model's rows are not). */
#define OVER_ROWS(R, N, K, ROWS_AT)                                          \
    do {                                                                     \
        int64_t blocks_ = (N) / (R);                                         \
        _Pragma("omp parallel for schedule(static) if ((N) * (K) >= (1 << 16))") \
        for (int64_t b_ = 0; b_ < blocks_; b_++) ROWS_AT(b_ * (R), (R));      \
        if (blocks_ * (R) < (N)) ROWS_AT(blocks_ * (R), (int)((N) - blocks_ * (R))); \
    } while (0)

/* bfloat16: products of bfloat16 pairs accumulate in float32 (vdpbf16ps) and the sum is
 * rounded to nearest even once, as a bfloat16 matmul's output is. On a 2-core Xeon, 16 rows
 * prefetching 32 ahead took the 262,144 x 640 head from 22 ms (no prefetch) to 14.5 ms and
 * 126 projections of the 270M from 14 ms to 11 (8 rows, 16 or 64 ahead, or L1 were slower). */
#define ROWS_BF16 16
#define AHEAD_BF16 32

AVX512_BF16 static void rows_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t n0, int r, int64_t K) {
    __m512 acc[ROWS_BF16];
    for (int i = 0; i < r; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
        for (int i = 0; i < r; i++) {
            const uint16_t *p = W + (n0 + i) * K + k;
            _mm_prefetch((const char *)(p + AHEAD_BF16 * K), _MM_HINT_T1);
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512((const void *)p), xv);
        }
    }
    if (k < K) {  /* the last K % 32 columns, the rest of each register zeroed */
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + k);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_maskz_loadu_epi16(m, W + (n0 + i) * K + k), xv);
    }
    for (int i = 0; i < r; i++) y[n0 + i] = to_bf16(_mm512_reduce_add_ps(acc[i]));
}

/* y (1, N) = x (1, K) @ W.T (M is always 1: the signature is the float32 loop's) */
AVX512_BF16 void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    (void)M;
#define BF16_AT(n0, r) rows_bf16(W, x, y, n0, r, K)
    OVER_ROWS(ROWS_BF16, N, K, BF16_AT);
#undef BF16_AT
}

/* float32: fused multiply-adds in 16 float32 lanes, for 1 to MAX_M rows of x (a batch decoding
 * together, as the app's two columns do) in one read of W: each weight row is loaded once for
 * all M rows, and every output is summed the same way whatever M is (the same lanes, the same
 * order), so row m of a batch has the bits of x[m] alone. On the same Xeon, one row read the
 * head at 25-28 GB/s against 22-23 for MKL's sgemv and the 126 projections at 23-25 against
 * 20-22 (4 weight rows per block were as fast as 8 or 16; 16 rows ahead as 32); two rows took
 * the head in 1.1x one row's time. */
#define MAX_M 4
#define ROWS_F32 4
#define AHEAD_F32 16

AVX512 static void rows_f32(const float *W, const float *x, float *y, int64_t n0, int r, int64_t N, int64_t K, int M) {
    __m512 acc[MAX_M][ROWS_F32];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < r; i++) acc[m][i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int i = 0; i < r; i++) {
            const float *p = W + (n0 + i) * K + k;
            _mm_prefetch((const char *)(p + AHEAD_F32 * K), _MM_HINT_T1);
            __m512 wv = _mm512_loadu_ps(p);
            for (int m = 0; m < M; m++) acc[m][i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][i]);
        }
    }
    if (k < K) {  /* the last K % 16 columns, the rest of each register zeroed */
        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1);
        for (int i = 0; i < r; i++) {
            __m512 wv = _mm512_maskz_loadu_ps(mk, W + (n0 + i) * K + k);
            for (int m = 0; m < M; m++) acc[m][i] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mk, x + m * K + k), acc[m][i]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < r; i++) y[m * N + n0 + i] = _mm512_reduce_add_ps(acc[m][i]);
}

/* y (M, N) = x (M, K) @ W.T for 1 <= M <= MAX_M */
AVX512 void gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
#define F32_AT(n0, r) rows_f32(W, x, y, n0, r, N, K, (int)M)
    OVER_ROWS(ROWS_F32, N, K, F32_AT);
#undef F32_AT
}

/* float32 on CPUs with AVX2 and FMA but not AVX-512 (for the native step, step_avx2.c): the
 * loop above in 8 lanes, the last K % 8 columns through a masked load. */
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 static void rows_f32_avx2(const float *W, const float *x, float *y, int64_t n0, int r, int64_t N, int64_t K, int M) {
    __m256 acc[MAX_M][ROWS_F32];
    for (int m = 0; m < M; m++)
        for (int i = 0; i < r; i++) acc[m][i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        for (int i = 0; i < r; i++) {
            const float *p = W + (n0 + i) * K + k;
            if ((k & 15) == 0) _mm_prefetch((const char *)(p + AHEAD_F32 * K), _MM_HINT_T1);
            __m256 wv = _mm256_loadu_ps(p);
            for (int m = 0; m < M; m++) acc[m][i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][i]);
        }
    }
    if (k < K) {
        __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K - k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int i = 0; i < r; i++) {
            __m256 wv = _mm256_maskload_ps(W + (n0 + i) * K + k, mk);
            for (int m = 0; m < M; m++) acc[m][i] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + m * K + k, mk), acc[m][i]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int i = 0; i < r; i++) y[m * N + n0 + i] = sum8(acc[m][i]);
}

/* y (M, N) = x (M, K) @ W.T for 1 <= M <= MAX_M */
AVX2 void gemv_f32_avx2(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
#define F32_AVX2_AT(n0, r) rows_f32_avx2(W, x, y, n0, r, N, K, (int)M)
    OVER_ROWS(ROWS_F32, N, K, F32_AVX2_AT);
#undef F32_AVX2_AT
}

/* bfloat16 for the native step's AVX2 build (CPUs without AVX512-BF16): each weight widened to
 * float32 (a shift), products and sums in float32 in 8 lanes, the sum rounded to bfloat16
 * once, as gemv_bf16's is. x is widened once per call. */
#define ROWS_BF16_AVX2 4

AVX2 static void rows_bf16_avx2(const uint16_t *W, const float *xf, uint16_t *y, int64_t n0, int r, int64_t K) {
    __m256 acc[ROWS_BF16_AVX2];
    for (int i = 0; i < r; i++) acc[i] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(xf + k);
        for (int i = 0; i < r; i++) {
            const uint16_t *p = W + (n0 + i) * K + k;
            if ((k & 31) == 0) _mm_prefetch((const char *)(p + AHEAD_BF16 * K), _MM_HINT_T1);
            __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
            acc[i] = _mm256_fmadd_ps(_mm256_castsi256_ps(w), xv, acc[i]);
        }
    }
    for (int i = 0; i < r; i++) {
        float t = sum8(acc[i]);
        for (int64_t j = k; j < K; j++) t += bf16_float(W[(n0 + i) * K + j]) * xf[j];  /* the last K % 8 */
        y[n0 + i] = to_bf16(t);
    }
}

/* y (1, N) = x (1, K) @ W.T, bfloat16, on AVX2 (M is always 1) */
AVX2 void gemv_bf16_avx2(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    (void)M;
    float xf[K];  /* a few KB: one row of a decode step */
    for (int64_t k = 0; k < K; k++) xf[k] = bf16_float(x[k]);
#define BF16_AVX2_AT(n0, r) rows_bf16_avx2(W, xf, y, n0, r, K)
    OVER_ROWS(ROWS_BF16_AVX2, N, K, BF16_AVX2_AT);
#undef BF16_AVX2_AT
}
