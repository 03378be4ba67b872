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

/* int4 in groups of 32 (`loading.lowbit`): row n holds K/2 bytes, byte j = column j (low
 * nibble) and column j + K/2 (high nibble), and per group g a bfloat16 step S[n, g] and lo
 * S[n, G + g], w = lo + code * step. Then
 *     y[n] = sum_g step[g] * (codes of g . x of g) + sum_g lo[g] * (sum of x over g).
 * x comes in bfloat16 (as torch's int4 kernel takes it); codes become bfloat16 exactly by a
 * 16-entry table (vpermw), each group's dot product is one vdpbf16ps of 32 pairs, scaled by
 * its step in 16 float32 lanes. K/2 must be a multiple of 32 (each 32 bytes: one group of
 * low nibbles, one of high). The lo term's group sums of x are made once per call. */
#define ROWS_I4 8
#define AHEAD_I4 32

AVX512_BF16 static inline __m512 widen_bf16(__m256i h) {  /* 16 bfloat16 -> 16 float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512_BF16 static void rows_int4(const uint8_t *Q, const uint16_t *S, const uint16_t *x, const float *xs,
                                  float *y, int64_t n0, int r, int64_t K) {
    const int64_t B = K / 2, G = K / 32, H = G / 2;
    static const uint16_t table[32] = {0, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                       0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    const __m512i T = _mm512_loadu_si512((const void *)table);
    const __m512i low = _mm512_set1_epi16(0x0f);
    __m512 acc[ROWS_I4];
    for (int i = 0; i < r; i++) {
        const uint16_t *s = S + (n0 + i) * 2 * G;
        _mm_prefetch((const char *)(s + AHEAD_I4 * 2 * G), _MM_HINT_T1);
        _mm_prefetch((const char *)(s + AHEAD_I4 * 2 * G) + 64, _MM_HINT_T1);
        __m512 a = _mm512_setzero_ps();  /* the lo term: lo . (group sums of x), 16 groups a time */
        for (int64_t g = 0; g < G; g += 16) {
            __mmask16 m = (G - g >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (G - g)) - 1);
            a = _mm512_fmadd_ps(widen_bf16(_mm256_maskz_loadu_epi16(m, s + G + g)), _mm512_maskz_loadu_ps(m, xs + g), a);
        }
        acc[i] = a;
    }
    for (int64_t c = 0; c < H; c++) {  /* bytes 32c..32c+31: groups c (low) and c + H (high) */
        __m512bh xl = (__m512bh)_mm512_loadu_si512((const void *)(x + 32 * c));
        __m512bh xh = (__m512bh)_mm512_loadu_si512((const void *)(x + B + 32 * c));
        for (int i = 0; i < r; i++) {
            const uint8_t *p = Q + (n0 + i) * B + 32 * c;
            const uint16_t *s = S + (n0 + i) * 2 * G;
            if ((c & 1) == 0) _mm_prefetch((const char *)(p + AHEAD_I4 * B), _MM_HINT_T1);
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
            __m512bh cl = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low), T);
            __m512bh ch = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), T);
            uint32_t sl = (uint32_t)s[c] << 16, sh = (uint32_t)s[c + H] << 16;
            float fl, fh;
            memcpy(&fl, &sl, 4);
            memcpy(&fh, &sh, 4);
            acc[i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), cl, xl), _mm512_set1_ps(fl), acc[i]);
            acc[i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), ch, xh), _mm512_set1_ps(fh), acc[i]);
        }
    }
    for (int i = 0; i < r; i++) y[n0 + i] = _mm512_reduce_add_ps(acc[i]);
}

/* y (N) float32 = x (K, bfloat16) @ w.T for the int4 weight (Q, S) above */
AVX512_BF16 void gemv_int4(const uint8_t *Q, const uint16_t *S, const uint16_t *x, float *y, int64_t N, int64_t K) {
    float xs[64];  /* group sums of x: K <= 2048 (checked by the caller) */
    for (int64_t g = 0; g < K / 32; g++) {
        float t = 0;
        for (int k = 0; k < 32; k++) {
            uint32_t u = (uint32_t)x[32 * g + k] << 16;
            float f;
            memcpy(&f, &u, 4);
            t += f;
        }
        xs[g] = t;
    }
#define I4_AT(n0, r) rows_int4(Q, S, x, xs, y, n0, r, K)
    OVER_ROWS(ROWS_I4, N, K / 4, I4_AT);
#undef I4_AT
}
