"""The C source of :mod:`.cpu_kernels` (the int8 matvec for AVX-512 or AVX2 + FMA, the one-pass
decode attention for AVX-512): what each kernel does, its figures and how it is built and loaded
are in that module's docstring."""

# e^x for 16 floats (clamped to [-87, 88]): 2^n p(r), |r| <= ln2 / 2, degree 7; the AVX-512 kernels'
# one (the decode attention's softmax here, SiLU in .cpu_fused)
EXP512 = r"""
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);   /* |r| <= ln2 / 2 */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
"""

SOURCE = (
    r"""
#include <stdint.h>
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>
/* int8 matvec: out[t, n] = scale[n] * sum_k x[t, k] * w[n, k], float32 sums in VL lanes. One
   weight row at a time against a tile of TT <= 8 rows of x (one accumulator each: TT FMAs per
   widened weight vector), the tiles one after another; from 3 rows the weights 2 KiB ahead
   prefetched (once a cache line; at 1-2 rows that was slower). AVX-512 (16 lanes) where the compiler targets it, else AVX2 + FMA (8). */
#define PREFETCH 2048
#if defined(__AVX512F__)
#define ISA 512
#define VL 16
typedef __m512 vf;
#define VZERO() _mm512_setzero_ps()
#define VLOADX(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define WIDEN(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 256
#define VL 8
typedef __m256 vf;
#define VZERO() _mm256_setzero_ps()
#define VLOADX(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define WIDEN(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "the CPU kernels need AVX-512 F or AVX2 + FMA"
#endif

int kernel_isa(void) { return ISA; }

/* U accumulator chains a row of x: one chain waits on the FMA latency at 1-2 rows (AVX-512), 1-4
   (AVX2); U = 4 at one row was slower with AVX-512 (13.8 vs 7.9 ms a SmolLM2 step) */
#define INT8_TILE(TT, U)                                                                        \
static void int8_tile_##TT(const float *x, const int8_t *w, const float *scale, float *out,     \
                           int64_t N, int64_t K, const int8_t *end) {                           \
    for (int64_t n = 0; n < N; n++) {                                                           \
        const int8_t *wr = w + n * K;                                                           \
        vf acc[U][TT];                                                                          \
        for (int u = 0; u < U; u++)                                                             \
            for (int t = 0; t < TT; t++) acc[u][t] = VZERO();                                   \
        int64_t k = 0;                                                                          \
        for (; k + (U) * VL <= K; k += (U) * VL) {                                              \
            const int8_t *ahead = wr + k + PREFETCH;                                            \
            if (TT >= 3 && ((uintptr_t)ahead & 63) < (U) * VL && ahead < end)                   \
                _mm_prefetch((const char *)ahead, _MM_HINT_T0);                                 \
            for (int u = 0; u < U; u++) {                                                       \
                vf wf = WIDEN(wr + k + u * VL);                                                 \
                for (int t = 0; t < TT; t++)                                                    \
                    acc[u][t] = VFMA(wf, VLOADX(x + t * K + k + u * VL), acc[u][t]);            \
            }                                                                                   \
        }                                                                                       \
        for (; k + VL <= K; k += VL) {                                                          \
            vf wf = WIDEN(wr + k);                                                              \
            for (int t = 0; t < TT; t++) acc[0][t] = VFMA(wf, VLOADX(x + t * K + k), acc[0][t]);\
        }                                                                                       \
        for (int t = 0; t < TT; t++) {                                                          \
            for (int u = 1; u < U; u++) acc[0][t] = VADD(acc[0][t], acc[u][t]);                 \
            float s = VSUM(acc[0][t]);                                                          \
            for (int64_t j = k; j < K; j++) s += x[t * K + j] * (float)wr[j];                   \
            out[t * N + n] = s * scale[n];                                                      \
        }                                                                                       \
    }                                                                                           \
}
INT8_TILE(1, (VL == 8 ? 4 : 2)) INT8_TILE(2, 2) INT8_TILE(3, (VL == 8 ? 2 : 1))
INT8_TILE(4, (VL == 8 ? 2 : 1))
INT8_TILE(5, 1) INT8_TILE(6, 1) INT8_TILE(7, 1) INT8_TILE(8, 1)
typedef void (*int8_tile)(const float *, const int8_t *, const float *, float *, int64_t,
                          int64_t, const int8_t *);
static const int8_tile INT8_TILES[8] = {int8_tile_1, int8_tile_2, int8_tile_3, int8_tile_4,
                                        int8_tile_5, int8_tile_6, int8_tile_7, int8_tile_8};

/* T rows of x in ceil(T / 8) passes over the weights, tiles of equal size (12: 6 + 6) */
void int8_matvec(const float *x, const int8_t *w, const float *scale, float *out,
                 int64_t T, int64_t N, int64_t K) {
    const int8_t *end = w + N * K;
    int64_t passes = (T + 7) / 8;
    for (int64_t t0 = 0, p = 0; p < passes; p++) {
        int64_t tt = (T - t0 + (passes - p) - 1) / (passes - p);
        INT8_TILES[tt - 1](x + t0 * K, w, scale, out + t0 * N, N, K, end);
        t0 += tt;
    }
}

#if defined(__AVX512F__)
static inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* Decode attention in one pass (flash-decoding style) straight from the K/V pool: each key row
   is read once, its K for the scores and its V for the outputs while it is in cache, with an
   online softmax (running max m, sum l, unnormalised output per query head).
   pool: rows of [2, Hk, D] floats; out [N, Hk, G, D]; q the same with rows qstride floats
   apart (unscaled: scale applied here).
   segs [S, 4]: (slot_lo, slot_hi, row_lo, row_hi): the query rows rows[row_lo:row_hi] attend the
   keys at slots[slot_lo:slot_hi]; a row may take part in several segments (a shared prefix read
   once for all its rows, then its own keys). C = ceil(D / 16) <= 8, the last chunk masked. */
"""
    + EXP512
    + r"""
/* Lane i of the result: the sum of v[i]'s 16 lanes (16 horizontal sums in 45 instructions:
   pairs interleaved within 128-bit lanes, then the four 128-bit lanes added). */
static inline __attribute__((always_inline)) __m512 hsum16(const __m512 *v) {
    __m512 a[8], w[4], z[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the lane's sums of v[4i .. 4i+3] */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)  /* [w0 L0+L1, w0 L2+L3, w1 L0+L1, w1 L2+L3] */
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

/* One block of n <= BL keys (slots ks) for the R rows rr of a segment; sc: [R, H, BL] scratch. */
static inline __attribute__((always_inline)) void attend_block(
        const int C, const float *q, int64_t qstride, const float *pool, const int64_t *ks, int64_t n,
        const int64_t *rr, int64_t R, float *sc, float *m, float *l, float *out, int64_t BL,
        int64_t Hk, int64_t G, int64_t D, float scale, __mmask16 tail, const int64_t *next, int64_t ahead) {
    const int64_t row = 2 * Hk * D, H = Hk * G;
    if (C <= 2) {  /* heads of <= 32: the sums across lanes cost more than the products */
        /* 16 keys at a time: 16 product vectors summed across their lanes together (hsum16),
           one store. The next block's rows are prefetched spread over the P passes (row j in
           pass j % P, at key j), as the other path spreads them over its one pass */
        const int64_t P = Hk * R * G;
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t r = 0; r < R; r++)
                for (int64_t g = 0; g < G; g++) {
                    const float *qv = q + rr[r] * qstride + (h * G + g) * D;
                    __m512 qc[2];
                    for (int c = 0; c < C; c++)
                        qc[c] = c == C - 1 ? _mm512_maskz_loadu_ps(tail, qv + 16 * c) : _mm512_loadu_ps(qv + 16 * c);
                    int64_t pf = (h * R + r) * G + g;  /* the next row this pass prefetches */
                    float *s = sc + (r * H + h * G + g) * BL;
                    for (int64_t j0 = 0; j0 < n; j0 += 16) {
                        const int64_t mm = n - j0 < 16 ? n - j0 : 16;
                        __m512 t[16];
                        for (int jj = 0; jj < 16; jj++) {
                            if (jj >= mm) { t[jj] = _mm512_setzero_ps(); continue; }
                            const float *kr = pool + ks[j0 + jj] * row + h * D;
                            if (j0 + jj == pf) {
                                if (pf < ahead)
                                    for (int64_t b = 0; b < row * 4; b += 64)
                                        _mm_prefetch((const char *)(pool + next[pf] * row) + b, _MM_HINT_T1);
                                pf += P;
                            }
                            __m512 a = _mm512_mul_ps(C == 1 ? _mm512_maskz_loadu_ps(tail, kr) : _mm512_loadu_ps(kr), qc[0]);
                            if (C == 2) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, kr + 16), qc[1], a);
                            t[jj] = a;
                        }
                        _mm512_mask_storeu_ps(s + j0, mm == 16 ? 0xFFFF : (__mmask16)((1u << mm) - 1),
                                              _mm512_mul_ps(hsum16(t), _mm512_set1_ps(scale)));
                    }
                }
    } else {  /* key by key: scores, q . k of every (row, head) */
    for (int64_t j = 0; j < n; j++) {
        const float *kr = pool + ks[j] * row;
        if (j < ahead)  /* the next block's rows (next[:ahead]) into L2, while this one computes */
            for (int64_t b = 0; b < row * 4; b += 64) _mm_prefetch((const char *)(pool + next[j] * row) + b, _MM_HINT_T1);
        for (int64_t h = 0; h < Hk; h++) {
            __m512 k[8];
            for (int c = 0; c < C; c++)
                k[c] = c == C - 1 ? _mm512_maskz_loadu_ps(tail, kr + h * D + 16 * c)
                                  : _mm512_loadu_ps(kr + h * D + 16 * c);
            for (int64_t r = 0; r < R; r++)
                for (int64_t g = 0; g < G; g++) {
                    const float *qv = q + rr[r] * qstride + (h * G + g) * D;
                    __m512 a = _mm512_mul_ps(k[0], C == 1 ? _mm512_maskz_loadu_ps(tail, qv)
                                                          : _mm512_loadu_ps(qv));
                    for (int c = 1; c < C; c++)
                        a = _mm512_fmadd_ps(k[c], c == C - 1 ? _mm512_maskz_loadu_ps(tail, qv + 16 * c)
                                                             : _mm512_loadu_ps(qv + 16 * c), a);
                    sc[(r * H + h * G + g) * BL + j] = _mm512_reduce_add_ps(a) * scale;
                }
        }
    }
    }
    __mmask16 left = n % 16 ? (__mmask16)((1u << (n % 16)) - 1) : 0xFFFF;
    for (int64_t r = 0; r < R; r++)  /* online softmax: new max, rescale, p = e^(s - m) */
        for (int64_t hg = 0; hg < H; hg++) {
            float *s = sc + (r * H + hg) * BL;
            const int64_t at = rr[r] * H + hg;
            __m512 mx = _mm512_set1_ps(-__builtin_inff());
            for (int64_t j = 0; j < n; j += 16)
                mx = _mm512_mask_max_ps(mx, j + 16 <= n ? 0xFFFF : left, mx, _mm512_loadu_ps(s + j));
            float mnew = _mm512_reduce_max_ps(mx);
            if (mnew < m[at]) mnew = m[at];
            __m512 mv = _mm512_set1_ps(mnew), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16) {
                __mmask16 lm = j + 16 <= n ? 0xFFFF : left;
                __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(lm, s + j), mv));
                sum = _mm512_mask_add_ps(sum, lm, sum, p);
                _mm512_mask_storeu_ps(s + j, lm, p);
            }
            float alpha = m[at] == -__builtin_inff() ? 0.f
                          : _mm512_cvtss_f32(exp512(_mm512_set1_ps(m[at] - mnew)));
            l[at] = l[at] * alpha + _mm512_reduce_add_ps(sum);
            m[at] = mnew;
            if (alpha != 1.f) {
                float *o = out + at * D;
                for (int c = 0; c < C; c++) {
                    __mmask16 cm = c == C - 1 ? tail : 0xFFFF;
                    _mm512_mask_storeu_ps(o + 16 * c, cm, _mm512_mul_ps(_mm512_maskz_loadu_ps(cm, o + 16 * c),
                                                                        _mm512_set1_ps(alpha)));
                }
            }
        }
    for (int64_t r = 0; r < R; r++)  /* out += p v, the block's V rows (in cache) */
        for (int64_t h = 0; h < Hk; h++)
            for (int64_t g = 0; g < G; g++) {
                const int64_t at = rr[r] * H + h * G + g;
                const float *p = sc + (r * H + h * G + g) * BL;
                float *o = out + at * D;
                __m512 a[8];
                for (int c = 0; c < C; c++)
                    a[c] = _mm512_maskz_loadu_ps(c == C - 1 ? tail : 0xFFFF, o + 16 * c);
                for (int64_t j = 0; j < n; j++) {
                    const float *v = pool + ks[j] * row + (Hk + h) * D;
                    __m512 pj = _mm512_set1_ps(p[j]);
                    for (int c = 0; c < C; c++)
                        a[c] = _mm512_fmadd_ps(pj, c == C - 1 ? _mm512_maskz_loadu_ps(tail, v + 16 * c)
                                                              : _mm512_loadu_ps(v + 16 * c), a[c]);
                }
                for (int c = 0; c < C; c++)
                    _mm512_mask_storeu_ps(o + 16 * c, c == C - 1 ? tail : 0xFFFF, a[c]);
            }
}

int decode_attend(const float *q, const float *pool, const int64_t *slots, const int64_t *segs,
                  const int64_t *rows, float *out, int64_t N, int64_t S, int64_t Hk, int64_t G,
                  int64_t D, int64_t qstride, float scale) {
    const int64_t H = Hk * G, C = (D + 15) / 16, row = 2 * Hk * D;
    if (C > 8) return -1;
    int64_t BL = 24576 / (row * 4), maxr = 1;  /* a block's K/V rows fit a 32 KiB L1 */
    BL = BL < 8 ? 8 : BL > 128 ? 128 : BL;
    for (int64_t s = 0; s < S; s++)
        if (segs[4 * s + 3] - segs[4 * s + 2] > maxr) maxr = segs[4 * s + 3] - segs[4 * s + 2];
    float *m = malloc(sizeof(float) * N * H), *l = malloc(sizeof(float) * N * H);
    float *sc = malloc(sizeof(float) * maxr * H * BL);
    if (!m || !l || !sc) { free(m); free(l); free(sc); return -2; }
    for (int64_t i = 0; i < N * H; i++) { m[i] = -__builtin_inff(); l[i] = 0.f; }
    memset(out, 0, sizeof(float) * N * H * D);
    __mmask16 tail = lanes(D - 16 * (C - 1));
    int64_t kend = 0;  /* the end of the slots the segments read */
    for (int64_t s = 0; s < S; s++) kend = segs[4 * s + 1] > kend ? segs[4 * s + 1] : kend;
    for (int64_t s = 0; s < S; s++) {
        const int64_t *sg = segs + 4 * s, *rr = rows + sg[2], R = sg[3] - sg[2];
        for (int64_t k0 = sg[0]; k0 < sg[1]; k0 += BL) {
            int64_t n = sg[1] - k0 < BL ? sg[1] - k0 : BL;
            /* prefetched: the next BL keys in the slot list, across the end of the segment (its
               next segment's first block was read cold: -17% a SmolLM2 step's attention) */
            int64_t at = k0 + n, ahead = kend - at < BL ? kend - at : BL;
            switch (C) {
#define CASE(c) case c: attend_block(c, q, qstride, pool, slots + k0, n, rr, R, sc, m, l, out, BL, Hk, G, D, scale, tail, slots + at, ahead); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
            }
        }
    }
    for (int64_t i = 0; i < N * H; i++) {  /* normalise; l > 0 for every row with a key */
        float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < D; d++) out[i * D + d] *= inv;
    }
    free(m); free(l); free(sc);
    return 0;
}
#endif
"""
)
