/* The candidate stage's approximate entity score of every stored video (hbi_runtime/index/candidates.py).
 *
 * Each valid frame token of a video is stored as the id of its nearest centroid (uint16; 0xFFFF marks a padded
 * frame), so <query token l, frame token> is approximated by table[code][l], a table the caller computes for the
 * query (every centroid against every valid query token), together with best[code] = max_l table[code][l]. With
 * s(l, f) that approximation, a video's approximate score is HBI's entity score (both halves) computed from it:
 *
 *     sum_l w_l max_f s(l, f)  +  sum_f vw_f max(floor, best[code_f])
 *
 * where a padded frame gives s = 0 and weight 0, as in exact scoring, and floor is 0 when the query has padded
 * positions (they give s = 0 in exact scoring), else a large negative value.
 *
 * Layout: the table is (codes, lp) float32 with lp a multiple of 16; the lanes past the query's valid tokens hold a
 * large negative value (they never win a max) and have weight 0. Rows [start, stop) per call; the caller runs one
 * call per thread on contiguous chunks (ctypes releases the GIL). An AVX-512 path keeps the query's lanes in
 * registers (up to 64 tokens); the portable path is plain C for the compiler's vectoriser.
 *
 * A C library loaded with ctypes (the module init below only makes it importable as an extension).
 */
#include <Python.h>
#include <stdint.h>

#define HBI_EXPORT __attribute__((visibility("default")))
#define NO_CODE 0xFFFFu
#define LANES 16
#define MAX_LP 256
#define NEG (-3.0e38f)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HBI_X86 1
#include <immintrin.h>
#endif

static inline float fmaxf_(float a, float b) { return a > b ? a : b; }

/* the portable path (any CPU) */
static void approx_rows(const uint16_t *codes, const float *vweights, int64_t start, int64_t stop, int t,
                        const float *table, const float *best, int lp, const float *w, float floor_value,
                        float *out) {
    float tmax[MAX_LP];
    for (int64_t row = start; row < stop; ++row) {
        const uint16_t *c = codes + row * t;
        const float *vw = vweights + row * t;
        float v2t = 0.0f;
        for (int l = 0; l < lp; ++l) tmax[l] = NEG;
        for (int f = 0; f < t; ++f) {
            if (c[f] == NO_CODE) { /* a padded frame: s = 0, weight 0 */
                for (int l = 0; l < lp; ++l) tmax[l] = fmaxf_(tmax[l], 0.0f);
                continue;
            }
            const float *a = table + (int64_t)c[f] * lp;
            for (int l = 0; l < lp; ++l) tmax[l] = fmaxf_(tmax[l], a[l]);
            v2t += vw[f] * fmaxf_(floor_value, best[c[f]]);
        }
        float t2v = 0.0f;
        for (int l = 0; l < lp; ++l) t2v += w[l] * tmax[l];
        out[row - start] = t2v + v2t;
    }
}

#ifdef HBI_X86
#define HBI_AVX512 __attribute__((target("avx512f")))
/* nb blocks of 16 query tokens held in registers: a frame is nb loads and nb maxima, plus one scalar lookup */
static inline HBI_AVX512 __attribute__((always_inline)) void approx_rows_nb(
    const uint16_t *codes, const float *vweights, int64_t start, int64_t stop, int t, const float *table,
    const float *best, const float *w, float floor_value, float *out, const int nb) {
    const int lp = nb * LANES;
    const __m512 zero = _mm512_setzero_ps();
    __m512 wv[4];
    for (int b = 0; b < nb; ++b) wv[b] = _mm512_loadu_ps(w + b * LANES);
    for (int64_t row = start; row < stop; ++row) {
        const uint16_t *c = codes + row * t;
        const float *vw = vweights + row * t;
        __m512 tmax[4];
        for (int b = 0; b < nb; ++b) tmax[b] = _mm512_set1_ps(NEG);
        float v2t = 0.0f;
        for (int f = 0; f < t; ++f) {
            const unsigned code = c[f];
            if (code == NO_CODE) {
                for (int b = 0; b < nb; ++b) tmax[b] = _mm512_max_ps(tmax[b], zero);
                continue;
            }
            const float *a = table + (int64_t)code * lp;
            for (int b = 0; b < nb; ++b) tmax[b] = _mm512_max_ps(tmax[b], _mm512_loadu_ps(a + b * LANES));
            v2t += vw[f] * fmaxf_(floor_value, best[code]);
        }
        __m512 acc = _mm512_mul_ps(wv[0], tmax[0]);
        for (int b = 1; b < nb; ++b) acc = _mm512_fmadd_ps(wv[b], tmax[b], acc);
        out[row - start] = _mm512_reduce_add_ps(acc) + v2t;
    }
}

static HBI_AVX512 void approx_rows_avx512(const uint16_t *codes, const float *vweights, int64_t start, int64_t stop,
                                          int t, const float *table, const float *best, int lp, const float *w,
                                          float floor_value, float *out) {
    switch (lp / LANES) {
    case 1: approx_rows_nb(codes, vweights, start, stop, t, table, best, w, floor_value, out, 1); break;
    case 2: approx_rows_nb(codes, vweights, start, stop, t, table, best, w, floor_value, out, 2); break;
    case 3: approx_rows_nb(codes, vweights, start, stop, t, table, best, w, floor_value, out, 3); break;
    default: approx_rows_nb(codes, vweights, start, stop, t, table, best, w, floor_value, out, 4); break;
    }
}
#endif

/* The query's table: table[i][j] = <centroid i, token j> for j < l (lanes past l: NEG), best[i] its max over j.
 * tokens_t is (d, lp) row-major: the query tokens transposed, zero past l. The inner loop runs over the lanes, so
 * the compiler vectorises it without reordering any sum (a BLAS call costs more here: its threads' start-up on a
 * (c x d) x (d x 16) product). */
static inline __attribute__((always_inline)) void table_rows(const float *centroids, int64_t c, int d,
                                                             const float *tokens_t, int l, int lp, float *table,
                                                             float *best) {
    float acc[MAX_LP];
    for (int64_t i = 0; i < c; ++i) {
        const float *x = centroids + i * d;
        for (int j = 0; j < lp; ++j) acc[j] = 0.0f;
        for (int k = 0; k < d; ++k) {
            const float xk = x[k];
            const float *t = tokens_t + (int64_t)k * lp;
            for (int j = 0; j < lp; ++j) acc[j] += xk * t[j];
        }
        float m = NEG;
        float *dst = table + i * lp;
        for (int j = 0; j < l; ++j) {
            dst[j] = acc[j];
            m = fmaxf_(m, acc[j]);
        }
        for (int j = l; j < lp; ++j) dst[j] = NEG;
        best[i] = m;
    }
}

static void table_portable(const float *centroids, int64_t c, int d, const float *tokens_t, int l, int lp,
                           float *table, float *best) {
    table_rows(centroids, c, d, tokens_t, l, lp, table, best);
}

#ifdef HBI_X86
/* nb accumulators of 16 lanes in registers: d broadcast-FMAs each per centroid */
static inline HBI_AVX512 __attribute__((always_inline)) void table_nb(const float *centroids, int64_t c, int d,
                                                                      const float *tokens_t, int l, float *table,
                                                                      float *best, const int nb) {
    const int lp = nb * LANES;
    const __m512 neg = _mm512_set1_ps(NEG);
    const __mmask16 tail = (__mmask16)((l - (nb - 1) * LANES) >= LANES ? 0xFFFF
                                                                         : ((1u << (l - (nb - 1) * LANES)) - 1));
    for (int64_t i = 0; i < c; ++i) {
        const float *x = centroids + i * d;
        __m512 acc[4];
        for (int b = 0; b < nb; ++b) acc[b] = _mm512_setzero_ps();
        for (int k = 0; k < d; ++k) {
            const __m512 xk = _mm512_set1_ps(x[k]);
            const float *t = tokens_t + (int64_t)k * lp;
            for (int b = 0; b < nb; ++b) acc[b] = _mm512_fmadd_ps(xk, _mm512_loadu_ps(t + b * LANES), acc[b]);
        }
        acc[nb - 1] = _mm512_mask_blend_ps(tail, neg, acc[nb - 1]); /* lanes past l: NEG */
        __m512 m = acc[0];
        for (int b = 0; b < nb; ++b) {
            _mm512_storeu_ps(table + i * lp + b * LANES, acc[b]);
            m = _mm512_max_ps(m, acc[b]);
        }
        best[i] = _mm512_reduce_max_ps(m);
    }
}

static HBI_AVX512 void table_avx512(const float *centroids, int64_t c, int d, const float *tokens_t, int l, int lp,
                                    float *table, float *best) {
    switch (lp / LANES) {
    case 1: table_nb(centroids, c, d, tokens_t, l, table, best, 1); break;
    case 2: table_nb(centroids, c, d, tokens_t, l, table, best, 2); break;
    case 3: table_nb(centroids, c, d, tokens_t, l, table, best, 3); break;
    default: table_nb(centroids, c, d, tokens_t, l, table, best, 4); break;
    }
}
#endif

HBI_EXPORT int hbi_cand_table(const float *centroids, int64_t c, int d, const float *tokens_t, int l, int lp,
                              float *table, float *best) {
    if (l <= 0 || lp < l || lp > MAX_LP || lp % LANES || c < 0 || d <= 0) return 2;
#ifdef HBI_X86
    if (lp <= 4 * LANES && l > lp - LANES && __builtin_cpu_supports("avx512f")) {
        table_avx512(centroids, c, d, tokens_t, l, lp, table, best);
        return 0;
    }
#endif
    table_portable(centroids, c, d, tokens_t, l, lp, table, best);
    return 0;
}

/* 1 when the AVX-512 path runs here */
HBI_EXPORT int hbi_cand_avx512(void) {
#ifdef HBI_X86
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

/* 0 on success, 2 on bad sizes; avx512: 1 to allow that path (0 forces the portable one) */
HBI_EXPORT int hbi_cand_approx(const uint16_t *codes, const float *vweights, int64_t start, int64_t stop, int t,
                               const float *table, const float *best, int lp, const float *w, float floor_value,
                               float *out, int avx512) {
    if (lp <= 0 || lp > MAX_LP || lp % LANES || t <= 0 || start < 0 || stop < start) return 2;
#ifdef HBI_X86
    if (avx512 && lp <= 4 * LANES && hbi_cand_avx512()) {
        approx_rows_avx512(codes, vweights, start, stop, t, table, best, lp, w, floor_value, out);
        return 0;
    }
#endif
    (void)avx512;
    approx_rows(codes, vweights, start, stop, t, table, best, lp, w, floor_value, out);
    return 0;
}

static struct PyModuleDef hbi_cand_module = {
    PyModuleDef_HEAD_INIT, "_cand",
    "the candidate stage's approximate scores; a C library used through ctypes, see hbi_runtime/index/candidates.py",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cand(void) { return PyModule_Create(&hbi_cand_module); }
