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

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
/* threads only where there is enough to share (a tiny test model's rows are not) */
#define SHARE(N, K) ((N) * (K) >= (1 << 16))

/* bfloat16: products of bfloat16 pairs accumulate in float32 (vdpbf16ps) and the sum is
 * rounded to nearest even once, as a bfloat16 matmul's output is. On a 2-core Xeon, 16 rows
 * prefetching 32 ahead took the 262,144 x 640 head from 22 ms (no prefetch) to 14.5 ms and
 * 126 projections of the 270M from 14 ms to 11 (8 rows, 16 or 64 ahead, or L1 were slower). */
#define ROWS_BF16 16
#define AHEAD_BF16 32

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu))  /* NaN stays NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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

AVX512_BF16 void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t N, int64_t K) {
    int64_t blocks = N / ROWS_BF16;
    #pragma omp parallel for schedule(static) if (SHARE(N, K))
    for (int64_t b = 0; b < blocks; b++) rows_bf16(W, x, y, b * ROWS_BF16, ROWS_BF16, K);
    if (blocks * ROWS_BF16 < N) rows_bf16(W, x, y, blocks * ROWS_BF16, (int)(N - blocks * ROWS_BF16), K);
}

/* float32: fused multiply-adds in 16 float32 lanes. On the same Xeon, 8 rows prefetching 16
 * ahead read the head at 25-28 GB/s against 22-23 for MKL's sgemv, and the 126 projections
 * at 23-25 against 20-22 (16 rows, or 32 ahead, were within noise of it). */
#define ROWS_F32 8
#define AHEAD_F32 16

AVX512 static void rows_f32(const float *W, const float *x, float *y, int64_t n0, int r, int64_t K) {
    __m512 acc[ROWS_F32];
    for (int i = 0; i < r; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int i = 0; i < r; i++) {
            const float *p = W + (n0 + i) * K + k;
            _mm_prefetch((const char *)(p + AHEAD_F32 * K), _MM_HINT_T1);
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(p), xv, acc[i]);
        }
    }
    if (k < K) {  /* the last K % 16 columns, the rest of each register zeroed */
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int i = 0; i < r; i++)
            acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, W + (n0 + i) * K + k), xv, acc[i]);
    }
    for (int i = 0; i < r; i++) y[n0 + i] = _mm512_reduce_add_ps(acc[i]);
}

AVX512 void gemv_f32(const float *W, const float *x, float *y, int64_t N, int64_t K) {
    int64_t blocks = N / ROWS_F32;
    #pragma omp parallel for schedule(static) if (SHARE(N, K))
    for (int64_t b = 0; b < blocks; b++) rows_f32(W, x, y, b * ROWS_F32, ROWS_F32, K);
    if (blocks * ROWS_F32 < N) rows_f32(W, x, y, blocks * ROWS_F32, (int)(N - blocks * ROWS_F32), K);
}

/* A few rows of x (a batch decoding together: the app's two columns) against one read of W:
 * each weight row is loaded once for all M rows. Every output is summed exactly as rows_f32
 * sums it (the same lanes, the same order), so row m of the batch has the bits of x[m] alone. */
#define MAX_M 4
#define ROWS_FEW 4

AVX512 static void rows_few(const float *W, const float *x, float *y, int64_t n0, int r, int64_t N, int64_t K, int M) {
    __m512 acc[MAX_M][ROWS_FEW];
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
    if (k < K) {
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
AVX512 void gemv_f32_rows(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K) {
    int64_t blocks = N / ROWS_FEW;
    #pragma omp parallel for schedule(static) if (SHARE(N, K))
    for (int64_t b = 0; b < blocks; b++) rows_few(W, x, y, b * ROWS_FEW, ROWS_FEW, N, K, (int)M);
    if (blocks * ROWS_FEW < N) rows_few(W, x, y, blocks * ROWS_FEW, (int)(N - blocks * ROWS_FEW), N, K, (int)M);
}
