/* A whole decode step of one token in C: every layer's norms, products, RoPE, cache write and
 * attention, the final norm, the head, and the step record's logsumexp and argmax, in one call
 * with no Python between the products (built and called by native_decode.py; why it exists is
 * written there). Float32 models take the float32 loop of gemv.c for every product, bfloat16
 * models its bfloat16 loop.
 *
 * Activations are float32 here. In a bfloat16 model they are rounded to bfloat16 wherever the
 * eager lean step (fast_decode.py) holds a bfloat16 tensor: after each norm, product, RoPE
 * term, score, probability, residual sum; so it rounds where that step rounds. In a float32
 * model each elementwise op is the eager op's float32 arithmetic in the same order (the file is
 * built with -ffp-contract=off: no multiply-add is fused behind the code's back).
 *
 * A float32 model may hold int8 or int4 projections (`loading.lowbit`: w = lo + code * step,
 * per row or per group of columns): their products read the codes here (`rows_int8`,
 * `rows_int4`); a quantized embedding's row is looked up before the call (`first`), and a
 * quantized head runs after it, on the final hidden state left in `logits` (`head` NULL).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bfloat16.h"
#include "simd.h"

void gemv_f32(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K);
void gemv_f32_avx2(const float *W, const float *x, float *y, int64_t M, int64_t N, int64_t K);
void gemv_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K);
void gemv_bf16_avx2(const uint16_t *W, const uint16_t *x, uint16_t *y, int64_t M, int64_t N, int64_t K);
#ifdef STEP_AVX2
#define GEMV_F32 gemv_f32_avx2
#define GEMV_BF16 gemv_bf16_avx2
#else
#define GEMV_F32 gemv_f32
#define GEMV_BF16 gemv_bf16
#endif

enum { PROJECTIONS = 7, GAINS = 6 };            /* per layer, in the order below */
enum { FLOAT = 0, INT4 = 4, INT8 = 8 };         /* how a projection is stored (kinds) */
enum { Q, KP, VP, O, GATE, UP, DOWN };          /* projections: (out, in) row-major */
enum { PRE_ATTN, Q_NORM, K_NORM, POST_ATTN, PRE_FFW, POST_FFW };  /* gains (1 + w), float32 */

/* Everything a step reads and writes. Mirrored field for field by native_decode.Step (all
 * 8-byte fields, so that no padding can differ). */
typedef struct {
    int64_t layers, D, N, K, H, F, V, bf16;     /* sizes; bf16: weights, caches, activations */
    int64_t rows, slots_max;                    /* rows decoding together (<= 4); the most slots any layer holds */
    double eps, scale, emb_scale, softcap;      /* softcap <= 0: none */
    const void *table, *head;                   /* (V, D) embedding rows; head rows (the table if tied) */
    const float *final_gain;                    /* (D) */
    const void *const *proj;                    /* layers x PROJECTIONS weights */
    const float *const *gain;                   /* layers x GAINS (q and k norms: H, the rest D) */
    void *const *kc, *const *vc;                /* per layer: (rows, K, slots[i], H) cache buffers */
    const int64_t *slots, *lo, *end;            /* per layer: buffer slots, first kept slot, this token's slot */
    const float *const *rope;                   /* per layer: (rows, 2, H) cos then sin at each row's position */
    const int64_t *kinds, *groups;              /* per projection: FLOAT, INT4 or INT8; columns per (lo, step) */
    const float *const *qlo, *const *qstep;     /* per projection (quantized): (out, in / group) float32 */
    const int64_t *tokens;                      /* (rows) the new tokens */
    const float *first;                         /* (rows, D) their scaled embeddings, or NULL: from `table` */
    float *work;                                /* step_work floats */
    float *logits;                              /* (rows, V); (rows, D) the final hidden states where head is NULL */
    float *lse;                                 /* (rows) */
    int64_t *argmax;                            /* (rows) */
} Step;

/* Scratch, each activation for every row, row after row: h, y, o (D); q, z (N H); k, v (K H);
 * gate, up (F); then bf16 in and out of one row's product (the widest input, and V outputs:
 * the head's), where a quantized product keeps its group sums instead; scores (slots_max). */
static int64_t widest(const Step *s) {
    int64_t w = s->D;
    if (s->F > w) w = s->F;
    if (s->N * s->H > w) w = s->N * s->H;
    return w;
}

int64_t STEP_NAME(step_size)(void) { return (int64_t)sizeof(Step); }  /* checked against native_decode.Step */

static int64_t per_row(const Step *s) { return 3 * s->D + 2 * s->N * s->H + 2 * s->K * s->H + 2 * s->F; }

static uint16_t *bf16_area(const Step *s) { return (uint16_t *)(s->work + s->rows * per_row(s)); }

int64_t STEP_NAME(step_work)(const Step *s) {
    return s->rows * per_row(s) + (widest(s) + s->V) / 2 + 2 + s->slots_max + 16;
}

static inline float as_bf16(float f) { return bf16_float(to_bf16(f)); }

static void round_all(const Step *s, float *x, int64_t n) {
    if (s->bf16)
        for (int64_t i = 0; i < n; i++) x[i] = as_bf16(x[i]);
}

/* VL lanes of a float32 or bfloat16 array from element i on; m: which lanes are real */
ISA static inline vf load_lanes(const void *p, int64_t i, int bf16, vmask m) {
    return bf16 ? v_load_bf16((const uint16_t *)p + i, m) : v_maskload(m, (const float *)p + i);
}

/* e^x in VL lanes: 2^n e^r with |r| <= ln 2 / 2, e^r by Cephes' expf polynomial (~1 ulp) */
ISA static inline vf exp_lanes(vf x) {
    x = v_max(v_min(x, v_set1(88.7f)), v_set1(-104.0f));
    vf n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = v_fnmadd(n, v_set1(0.693359375f), x);
    r = v_fnmadd(n, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fmadd(p, r, v_set1(1.3981999507e-3f));
    p = v_fmadd(p, r, v_set1(8.3334519073e-3f));
    p = v_fmadd(p, r, v_set1(4.1665795894e-2f));
    p = v_fmadd(p, r, v_set1(1.6666665459e-1f));
    p = v_fmadd(p, r, v_set1(5.0000001201e-1f));
    p = v_fmadd(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_scale(p, n);
}

/* tanh(x) = 1 - 2 / (e^2x + 1): exact at the ends (e^2x overflows to inf, or is 0) */
ISA static inline vf tanh_lanes(vf x) {
    vf e = exp_lanes(v_add(x, x));
    return v_sub(v_set1(1.0f), v_div(v_set1(2.0f), v_add(e, v_set1(1.0f))));
}

/* q . k[at:at + H] in VL lanes, k float32 or bfloat16 (a cache's keys, say; x . x for a norm) */
ISA static float dot(const float *q, const void *k, int64_t at, int64_t H, int bf16) {
    vf acc = v_zero();
    for (int64_t i = 0; i < H; i += VL) {
        vmask m = v_lanes(H - i);
        acc = v_fmadd(v_maskload(m, q + i), load_lanes(k, at + i, bf16, m), acc);
    }
    return v_reduce(acc);
}

/* y = (x / rms(x)) * gain over n, then the cast back (RMSNorm.forward) */
ISA static void norm(const Step *s, const float *x, const float *gain, float *y, int64_t n) {
    float r = 1.0f / sqrtf(dot(x, x, 0, n, 0) / (float)n + (float)s->eps);
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] * r) * gain[i];
    round_all(s, y, n);
}

#define ROWS_Q 4
#define AHEAD_Q 16

/* int8 per row: w[n, k] = lo[n] + Q[n, k] * st[n], so y[n] = st[n] (Q[n] . x) + lo[n] sum(x) */
ISA static void rows_int8(const int8_t *Q, const float *lo, const float *st, const float *x, float sum_x,
                          float *y, int64_t n0, int r, int64_t K) {
    for (int i = 0; i < r; i++) {
        const int8_t *q = Q + (n0 + i) * K;
        vf acc = v_zero();
        for (int64_t k = 0; k < K; k += VL) {
            if ((k & 63) == 0) _mm_prefetch((const char *)(q + k + AHEAD_Q * K), _MM_HINT_T1);
            acc = v_fmadd(v_i8(q + k), v_loadu(x + k), acc);
        }
        y[n0 + i] = st[n0 + i] * v_reduce(acc) + lo[n0 + i] * sum_x;
    }
}

/* int4 in groups of G columns: row n holds K/2 bytes, byte j = column j (low nibble) and
 * column j + K/2 (high nibble) (`lowbit.pack_int4`). Each group's codes . x is kept in VL
 * lanes and scaled by its step as a whole, the low and the high half into sums of their own;
 * the lo terms are sum_g lo[n, g] sum(x in g), from the group sums `sx` made once per
 * product. No division in the loop and the lo terms in lanes: a division per group and the lo
 * terms one by one had cost more than the codes (on a 2-core Xeon, 11 -> 20 G weights/s at
 * groups of 32 and 6 -> 15 at 16, from cache). */
ISA static void rows_int4(const uint8_t *Q, const float *lo, const float *st, const float *x, const float *sx,
                          float *y, int64_t n0, int r, int64_t K, int64_t G) {
    int64_t half = K / 2, groups = K / G;
    for (int i = 0; i < r; i++) {
        int64_t n = n0 + i;
        const uint8_t *q = Q + n * half;
        const float *sl = st + n * groups, *sh = sl + groups / 2;  /* the low half's steps, the high half's */
        vf tl = v_zero(), th = v_zero();
        for (int64_t g0 = 0; g0 < half; g0 += G, sl++, sh++) {
            vf al = v_zero(), ah = v_zero();
            for (int64_t j = g0; j < g0 + G; j += VL) {
                if ((j & 63) == 0) _mm_prefetch((const char *)(q + j + AHEAD_Q * half), _MM_HINT_T1);
                __typeof__(v_u8(q)) b = v_u8(q + j);
                al = v_fmadd(v_low_nibble(b), v_loadu(x + j), al);
                ah = v_fmadd(v_high_nibble(b), v_loadu(x + half + j), ah);
            }
            tl = v_fmadd(al, v_set1(*sl), tl);
            th = v_fmadd(ah, v_set1(*sh), th);
        }
        y[n] = v_reduce(v_add(tl, th)) + dot(lo + n * groups, sx, 0, groups, 0);
    }
}

/* y (N) = x (K) @ w.T for projection p of a float32 model stored as int8 or int4 */
ISA static void quantized(const Step *s, int64_t p, const float *x, float *y, int64_t N, int64_t K) {
    int64_t G = s->groups[p], blocks = N / ROWS_Q;
    const float *lo = s->qlo[p], *st = s->qstep[p];
    float *sx = (float *)bf16_area(s);  /* free in a float32 model */
    for (int64_t g = 0; g < K / G; g++) {  /* G is a multiple of 16 (int4) or K (int8) */
        vf t = v_zero();
        for (int64_t k = g * G; k < (g + 1) * G; k += VL) t = v_add(t, v_loadu(x + k));
        sx[g] = v_reduce(t);
    }
    if (s->kinds[p] == INT8) {
        const int8_t *Q = (const int8_t *)s->proj[p];
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
        for (int64_t b = 0; b < blocks; b++) rows_int8(Q, lo, st, x, sx[0], y, b * ROWS_Q, ROWS_Q, K);
        if (blocks * ROWS_Q < N) rows_int8(Q, lo, st, x, sx[0], y, blocks * ROWS_Q, (int)(N - blocks * ROWS_Q), K);
    } else {
        const uint8_t *Q = (const uint8_t *)s->proj[p];
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
        for (int64_t b = 0; b < blocks; b++) rows_int4(Q, lo, st, x, sx, y, b * ROWS_Q, ROWS_Q, K, G);
        if (blocks * ROWS_Q < N) rows_int4(Q, lo, st, x, sx, y, blocks * ROWS_Q, (int)(N - blocks * ROWS_Q), K, G);
    }
}

/* y (rows, N) = x (rows, K) @ W.T for projection p (of layer p / 7; -1: the head), x and y
 * float32 holding bfloat16 values in a bfloat16 model. float32 weights are read once for all
 * rows (each row with its own bits: gemv.c); bfloat16 and quantized ones once per row. */
static void product(const Step *s, int64_t p, const void *W, const float *x, float *y, int64_t N, int64_t K) {
    if (!s->bf16 && (p < 0 || s->kinds[p] == FLOAT)) {
        GEMV_F32((const float *)W, x, y, s->rows, N, K);
        return;
    }
    for (int64_t m = 0; m < s->rows; m++, x += K, y += N) {
        if (p >= 0 && s->kinds[p] != FLOAT) {
            quantized(s, p, x, y, N, K);
            continue;
        }
        uint16_t *xb = bf16_area(s), *yb = xb + widest(s) + 2;
        for (int64_t i = 0; i < K; i++) xb[i] = to_bf16(x[i]);
        GEMV_BF16((const uint16_t *)W, xb, yb, 1, N, K);
        for (int64_t i = 0; i < N; i++) y[i] = bf16_float(yb[i]);
    }
}

/* x * cos + rotate_half(x) * sin for each of n heads of H, in place; each term rounded as the
 * eager step's tensors are */
static void rope(const Step *s, float *x, int64_t n, const float *cs) {
    int64_t H = s->H, half = H / 2;
    const float *c = cs, *sn = cs + H;
    for (int64_t h = 0; h < n; h++, x += H)
        for (int64_t j = 0; j < half; j++) {
            float a = x[j], b = x[j + half];
            float a1 = a * c[j], b1 = -b * sn[j], b2 = b * c[j + half], a2 = a * sn[j + half];
            if (s->bf16) {
                a1 = as_bf16(a1), b1 = as_bf16(b1), b2 = as_bf16(b2), a2 = as_bf16(a2);
                x[j] = as_bf16(a1 + b1), x[j + half] = as_bf16(b2 + a2);
            } else {
                x[j] = a1 + b1, x[j + half] = b2 + a2;
            }
        }
}

/* One query of row b (N heads, q: N x H) over slots lo..end of layer i: z (N x H). Query
 * heads are grouped per kv head, N / K of them to each. */
ISA static void attend(const Step *s, int64_t i, int64_t b, const float *q, float *z) {
    int64_t H = s->H, lo = s->lo[i], T = s->end[i] - lo + 1, cap = s->slots[i], group = s->N / s->K;
    float *p = s->work + STEP_NAME(step_work)(s) - s->slots_max - 16;
    for (int64_t n = 0; n < s->N; n++) {
        int64_t base = ((b * s->K + n / group) * cap + lo) * H;
        const float *qn = q + n * H;
        float top = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
            float d = dot(qn, s->kc[i], base + t * H, H, (int)s->bf16);
            p[t] = s->bf16 ? as_bf16(as_bf16(d) * (float)s->scale) : d * (float)s->scale;
            if (p[t] > top) top = p[t];
        }
        vf sum = v_zero();
        for (int64_t t = 0; t < T; t += VL) {
            vmask m = v_lanes(T - t);
            vf e = exp_lanes(v_sub(v_maskload(m, p + t), v_set1(top)));
            v_maskstore(p + t, m, e);
            sum = v_add(sum, v_keep(m, e));
        }
        float total = v_reduce(sum);
        for (int64_t t = 0; t < T; t++) p[t] = s->bf16 ? as_bf16(p[t] / total) : p[t] / total;
        float *zn = z + n * H;
        for (int64_t j = 0; j < H; j += VL) {
            vmask m = v_lanes(H - j);
            vf acc = v_zero();
            for (int64_t t = 0; t < T; t++)
                acc = v_fmadd(v_set1(p[t]), load_lanes(s->vc[i], base + t * H + j, (int)s->bf16, m), acc);
            v_maskstore(zn + j, m, acc);
        }
    }
    round_all(s, z, s->N * s->H);
}

/* row b's keys and values (K x H) into slot end of layer i */
static void write_slot(const Step *s, int64_t i, int64_t b, const float *k, const float *v) {
    int64_t H = s->H;
    for (int64_t g = 0; g < s->K; g++) {
        int64_t at = ((b * s->K + g) * s->slots[i] + s->end[i]) * H;
        if (s->bf16) {
            for (int64_t j = 0; j < H; j++) {
                ((uint16_t *)s->kc[i])[at + j] = to_bf16(k[g * H + j]);
                ((uint16_t *)s->vc[i])[at + j] = to_bf16(v[g * H + j]);
            }
        } else {
            memcpy((float *)s->kc[i] + at, k + g * H, H * sizeof(float));
            memcpy((float *)s->vc[i] + at, v + g * H, H * sizeof(float));
        }
    }
}

/* gelu(gate, tanh approximation) * up, into gate; the constants are torch's */
ISA static void gelu_times(const Step *s, float *g, const float *u, int64_t n) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
    for (int64_t i = 0; i < n; i += VL) {
        vmask m = v_lanes(n - i);
        vf x = v_maskload(m, g + i);
        vf inner = v_mul(v_set1(beta), v_add(x, v_mul(v_set1(kappa), v_mul(v_mul(x, x), x))));
        vf y = v_mul(v_mul(v_set1(0.5f), x), v_add(v_set1(1.0f), tanh_lanes(inner)));
        v_maskstore(g + i, m, y);
    }
    round_all(s, g, n);
    for (int64_t i = 0; i < n; i++) g[i] = g[i] * u[i];
    round_all(s, g, n);
}

/* a += b, rounded */
static void add_into(const Step *s, float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) a[i] = a[i] + b[i];
    round_all(s, a, n);
}

/* the soft cap, the logsumexp and the first argmax of row b's V logits */
ISA static void finish(const Step *s, int64_t b) {
    float *x = s->logits + b * s->V, cap = (float)s->softcap;
    int64_t V = s->V, best = 0;
    if (cap > 0)
        for (int64_t i = 0; i < V; i++) x[i] = s->bf16 ? as_bf16(as_bf16(tanhf(as_bf16(x[i] / cap))) * cap) : tanhf(x[i] / cap) * cap;
    float top = x[0];
    for (int64_t i = 1; i < V; i++)
        if (x[i] > top || (isnan(x[i]) && !isnan(top))) top = x[i], best = i;
    vf sum = v_zero();
    for (int64_t i = 0; i < V; i += VL) {
        vmask m = v_lanes(V - i);
        sum = v_add(sum, v_keep(m, exp_lanes(v_sub(v_maskload(m, x + i), v_set1(top)))));
    }
    s->lse[b] = isfinite(top) ? top + logf(v_reduce(sum)) : top;
    s->argmax[b] = best;
}

ISA void STEP_NAME(step_run)(const Step *s) {
    int64_t D = s->D, H = s->H, NH = s->N * H, KH = s->K * H, F = s->F, M = s->rows;
    /* each activation holds every row, row after row (products take all rows at once) */
    float *h = s->work, *y = h + M * D, *o = y + M * D, *q = o + M * D, *z = q + M * NH, *k = z + M * NH,
          *v = k + M * KH, *g = v + M * KH, *u = g + M * F;
    if (s->first) {
        memcpy(h, s->first, M * D * sizeof(float));
    } else {
        for (int64_t b = 0; b < M; b++)
            for (int64_t j = 0; j < D; j++) {
                int64_t at = s->tokens[b] * D + j;
                float e = s->bf16 ? bf16_float(((const uint16_t *)s->table)[at]) : ((const float *)s->table)[at];
                h[b * D + j] = e * (float)s->emb_scale;
            }
        round_all(s, h, M * D);
    }
    for (int64_t i = 0; i < s->layers; i++) {
        const void *const *w = s->proj + i * PROJECTIONS;
        const float *const *gn = s->gain + i * GAINS;
        int64_t p = i * PROJECTIONS;
        for (int64_t b = 0; b < M; b++) norm(s, h + b * D, gn[PRE_ATTN], y + b * D, D);
        product(s, p + Q, w[Q], y, q, NH, D);
        product(s, p + KP, w[KP], y, k, KH, D);
        product(s, p + VP, w[VP], y, v, KH, D);
        for (int64_t n = 0; n < M * s->N; n++) norm(s, q + n * H, gn[Q_NORM], q + n * H, H);
        for (int64_t n = 0; n < M * s->K; n++) norm(s, k + n * H, gn[K_NORM], k + n * H, H);
        for (int64_t b = 0; b < M; b++) {
            rope(s, q + b * NH, s->N, s->rope[i] + b * 2 * H);
            rope(s, k + b * KH, s->K, s->rope[i] + b * 2 * H);
            write_slot(s, i, b, k + b * KH, v + b * KH);
            attend(s, i, b, q + b * NH, z + b * NH);
        }
        product(s, p + O, w[O], z, o, D, NH);
        for (int64_t b = 0; b < M; b++) {
            norm(s, o + b * D, gn[POST_ATTN], o + b * D, D);
            add_into(s, h + b * D, o + b * D, D);
            norm(s, h + b * D, gn[PRE_FFW], y + b * D, D);
        }
        product(s, p + GATE, w[GATE], y, g, F, D);
        product(s, p + UP, w[UP], y, u, F, D);
        gelu_times(s, g, u, M * F);
        product(s, p + DOWN, w[DOWN], g, o, D, F);
        for (int64_t b = 0; b < M; b++) {
            norm(s, o + b * D, gn[POST_FFW], o + b * D, D);
            add_into(s, h + b * D, o + b * D, D);
        }
    }
    for (int64_t b = 0; b < M; b++) norm(s, h + b * D, s->final_gain, y + b * D, D);
    if (!s->head) {  /* a quantized head: it runs after the call, on these */
        memcpy(s->logits, y, M * D * sizeof(float));
        return;
    }
    product(s, -1, s->head, y, s->logits, s->V, D);
    for (int64_t b = 0; b < M; b++) finish(s, b);
}
