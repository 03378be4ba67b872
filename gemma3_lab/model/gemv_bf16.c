/* One bfloat16 row times a bfloat16 weight, for decode steps on CPUs with AVX512-BF16
 * (built and loaded by gemv_bf16.py; the reason it exists is written there).
 *
 * y[n] = round_bf16(sum_k x[k] * W[n, k]) for W (N, K) row-major, x (K), y (N).
 * Products of bfloat16 pairs accumulate in float32 (vdpbf16ps), 16 lanes per row, summed
 * across lanes at the row's end and rounded to nearest even once, as a bfloat16 matmul's
 * output is. Sixteen rows share each load of x, and the row 32 rows ahead is prefetched into
 * L2: on a 2-core Xeon this took the 262,144 x 640 head from 22 ms (no prefetch) to 14.5 ms
 * and 126 projections of the 270M (distinct weights) from 14 ms to 11 (8 rows, prefetching 16
 * or 64 ahead, or into L1, were 0.5-3 ms slower).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 16
#define AHEAD 32

static inline uint16_t to_bf16(float s) {
    uint32_t u;
    memcpy(&u, &s, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu))  /* NaN stays NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void rows(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t n0, int r, int64_t K) {
    __m512 acc[ROWS];
    for (int i = 0; i < r; i++) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
        for (int i = 0; i < r; i++) {
            const uint16_t *p = W + (n0 + i) * K + k;
            _mm_prefetch((const char *)(p + AHEAD * K), _MM_HINT_T1);
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

void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t N, int64_t K) {
    int64_t blocks = N / ROWS;
    /* threads only where there is enough to share (a tiny test model's rows are not) */
    #pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t b = 0; b < blocks; b++) rows(W, x, y, b * ROWS, ROWS, K);
    if (blocks * ROWS < N) rows(W, x, y, blocks * ROWS, (int)(N - blocks * ROWS), K);
}
