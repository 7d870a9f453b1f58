/*
 * hbi_runtime.scoring._vnni: the int8 scoring kernel of hbi_runtime.scoring (AVX-512 VNNI, x86-64).
 *
 * One query batch against the u8 codes of a chunk of stored videos, fused with every reduction of the level
 * score, so that the (videos, T, queries * L) similarity never leaves the cache and only the scores come out:
 *
 *   S_q[r, j]   = (codes[r] - 128) . q[j] * qscale[j]            r = video * T + frame, j = b * L + l
 *   t2v[v, b]   = sum_l qweight[b*L + l] * max_t (S_q[v*T + t, b*L + l] * vscale[v*T + t])
 *   v2t[v, b]   = sum_t vweight[v*T + t] * vscale[v*T + t] * max(qfloor[b], max_l S_q[v*T + t, b*L + l])
 *   score[b, v] = (t2v + v2t) / 2
 *
 * (the scales are >= 0, so scaling after a max equals scaling before it). Same arithmetic as the ORT graph of
 * hbi_runtime/scoring/engine.py up to float rounding.
 * The dot products are exact in int32: sum_k codes * q via vpdpbusd (u8 x s8), minus 128 * sum_k q.
 * Rows are taken four at a time against four query rows (16 accumulators): every 64-byte load feeds four
 * vpdpbusd, which keeps the loop on the multiply units instead of the load ports.
 *
 * It is a plain C library loaded with ctypes (the Python module init below only makes it importable, so that
 * setuptools builds it and Python finds it); ctypes releases the GIL, and the caller hands chunks of videos to its
 * threads, one call per chunk. Without AVX-512 VNNI (or off x86-64) hbi_vnni_supported() returns 0 and the caller uses
 * the ONNX Runtime path; nothing here runs then.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HBI_X86 1
#include <immintrin.h>
#endif

#define HBI_EXPORT __attribute__((visibility("default")))

HBI_EXPORT int hbi_vnni_supported(void) {
#ifdef HBI_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

#ifdef HBI_X86
#define HBI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* a + b over the lanes of one 128-bit block pair: x, y -> per block [x0+x2, y0+y2, x1+x3, y1+y3] and so on. */
#define HBI_ADD32(x, y) _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y))
#define HBI_ADD64(x, y) _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y))
#define HBI_ADD128(x, y) _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xDD))
/* acc += x (u8) . y (s8) per 4-byte group. Inline asm rather than _mm512_dpbusd_epi32: with the intrinsic, GCC 12
 * copied all 16 accumulators to other registers (and two to the stack) on every step of the dot loop, which cost
 * half the loop's time; the asm operand "+v" keeps each accumulator in place, as the instruction works. */
#define HBI_DP(acc, x, y) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(y))

/*
 * Dot products of 4 rows x 4 query rows, D bytes each: out[4 * i + j] = sum_k a[i][k] * b[j][k]. The 16
 * accumulators are named variables (an array of them made GCC spill every one to the stack on each step) and
 * are summed across lanes together by a transpose-and-add tree (45 instructions instead of 16 reductions). Whole
 * 64-byte blocks are loaded unmasked; only a tail of D % 64 bytes takes masked loads.
 */
HBI_TARGET static inline __m512i hbi_ld(const void *p, __mmask64 m, int full) {
    return full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(m, p);
}

#define HBI_TILE_STEP(k, m, full)                                                                       \
    do {                                                                                                \
        const __m512i q0 = hbi_ld(b0 + (k), m, full), q1 = hbi_ld(b1 + (k), m, full),                   \
                      q2 = hbi_ld(b2 + (k), m, full), q3 = hbi_ld(b3 + (k), m, full);                   \
        __m512i x = hbi_ld(a0 + (k), m, full);                                                          \
        HBI_DP(c00, x, q0); HBI_DP(c01, x, q1); HBI_DP(c02, x, q2); HBI_DP(c03, x, q3);                 \
        x = hbi_ld(a1 + (k), m, full);                                                                  \
        HBI_DP(c10, x, q0); HBI_DP(c11, x, q1); HBI_DP(c12, x, q2); HBI_DP(c13, x, q3);                 \
        x = hbi_ld(a2 + (k), m, full);                                                                  \
        HBI_DP(c20, x, q0); HBI_DP(c21, x, q1); HBI_DP(c22, x, q2); HBI_DP(c23, x, q3);                 \
        x = hbi_ld(a3 + (k), m, full);                                                                  \
        HBI_DP(c30, x, q0); HBI_DP(c31, x, q1); HBI_DP(c32, x, q2); HBI_DP(c33, x, q3);                 \
    } while (0)

HBI_TARGET static void dot_tile(const uint8_t *const a[4], const int8_t *const b[4], int D, int32_t out[16]) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
            c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    const int8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    const int full = D & ~63;
    int k = 0;
    for (; k < full; k += 64) HBI_TILE_STEP(k, ~(__mmask64)0, 1);
    if (k < D) {
        const __mmask64 m = ((__mmask64)1 << (D - k)) - 1;
        HBI_TILE_STEP(k, m, 0);
    }
    const __m512i u0 = HBI_ADD64(HBI_ADD32(c00, c01), HBI_ADD32(c02, c03)),
                  u1 = HBI_ADD64(HBI_ADD32(c10, c11), HBI_ADD32(c12, c13)),
                  u2 = HBI_ADD64(HBI_ADD32(c20, c21), HBI_ADD32(c22, c23)),
                  u3 = HBI_ADD64(HBI_ADD32(c30, c31), HBI_ADD32(c32, c33));
    _mm512_storeu_si512((void *)out, HBI_ADD128(HBI_ADD128(u0, u1), HBI_ADD128(u2, u3)));
}

HBI_TARGET static void score_videos(const uint8_t *codes, const float *vscales, const float *vweights,
                                    int64_t n_videos, int T, int D, const int8_t *q, const int32_t *q_offset,
                                    const float *qscales, const float *qweights, const float *qfloor, int BtL, int L,
                                    float *scores, int64_t stride, int32_t *dots, float *sim, float *tmax) {
    const int Bt = BtL / L;
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    for (int64_t v = 0; v < n_videos; v++) {
        const uint8_t *vcodes = codes + v * (int64_t)T * D;
        /* no software prefetch: the hardware prefetcher follows this sequential stream; explicit prefetches of
         * the next videos made the 100k-video scan 1.5x slower */
        /* dots[t * BtL + j] = codes of frame t . query row j; tiles past the edge repeat the last row */
        for (int t0 = 0; t0 < T; t0 += 4) {
            const int nr = T - t0 < 4 ? T - t0 : 4;
            const uint8_t *a[4];
            for (int i = 0; i < 4; i++) a[i] = vcodes + (int64_t)(t0 + (i < nr ? i : nr - 1)) * D;
            for (int j0 = 0; j0 < BtL; j0 += 4) {
                const int nq = BtL - j0 < 4 ? BtL - j0 : 4;
                const int8_t *b[4];
                int32_t tile[16];
                for (int j = 0; j < 4; j++) b[j] = q + (int64_t)(j0 + (j < nq ? j : nq - 1)) * D;
                dot_tile(a, b, D, tile);
                /* masked stores, not memcpy: a library call per row of a tile cost 15 % of the kernel */
                const __mmask8 mq = (__mmask8)((1u << nq) - 1);
                for (int i = 0; i < nr; i++)
                    _mm_mask_storeu_epi32(dots + (t0 + i) * BtL + j0, mq, _mm_loadu_si128((const __m128i *)(tile + 4 * i)));
            }
        }
        /* sim = (dots - offset) * qscale; tmax = max over frames of sim * vscale: 16 query rows per vector */
        const float *vs = vscales + v * T, *vw = vweights + v * T;
        for (int j0 = 0; j0 < BtL; j0 += 16) {
            const __mmask16 m = BtL - j0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (BtL - j0)) - 1);
            const __m512i off = _mm512_maskz_loadu_epi32(m, q_offset + j0);
            const __m512 qs = _mm512_maskz_loadu_ps(m, qscales + j0);
            __m512 best = lowest;
            for (int t = 0; t < T; t++) {
                const __m512i d = _mm512_maskz_loadu_epi32(m, dots + t * BtL + j0);
                const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, off)), qs);
                _mm512_mask_storeu_ps(sim + t * BtL + j0, m, x);
                best = _mm512_max_ps(best, _mm512_mul_ps(x, _mm512_set1_ps(vs[t])));
            }
            _mm512_mask_storeu_ps(tmax + j0, m, best);
        }
        for (int bq = 0; bq < Bt; bq++) {
            __m512 t2v = _mm512_setzero_ps();
            for (int l0 = 0; l0 < L; l0 += 16) {
                const __mmask16 m = L - l0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - l0)) - 1);
                t2v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qweights + bq * L + l0),
                                      _mm512_maskz_loadu_ps(m, tmax + bq * L + l0), t2v);
            }
            float v2t = 0.0f;
            const float floor_b = qfloor[bq];
            for (int t = 0; t < T; t++) {
                const float *row = sim + t * BtL + bq * L;
                __m512 best = lowest;
                for (int l0 = 0; l0 < L; l0 += 16) {
                    const __mmask16 m = L - l0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - l0)) - 1);
                    best = _mm512_max_ps(best, _mm512_mask_loadu_ps(lowest, m, row + l0));
                }
                const float m = _mm512_reduce_max_ps(best);
                v2t += (m > floor_b ? m : floor_b) * (vw[t] * vs[t]);
            }
            scores[bq * stride + v] = 0.5f * (_mm512_reduce_add_ps(t2v) + v2t);
        }
    }
}
#endif

/*
 * codes (n_videos*T, D) u8 with zero point 128; vscales, vweights (n_videos*T,); q (BtL, D) s8; q_offset (BtL,) =
 * 128 * sum_k q[j, k]; qscales, qweights (BtL,); qfloor (BtL / L,), each query's least max over its rows;
 * writes scores[b * stride + v] for b < BtL / L, v < n_videos.
 * Returns 0 on success, 1 when the CPU lacks AVX-512 VNNI, 2 on bad sizes, 3 when out of memory.
 */
HBI_EXPORT int hbi_score_u8s8(const uint8_t *codes, const float *vscales, const float *vweights, int64_t n_videos,
                              int T, int D, const int8_t *q, const int32_t *q_offset, const float *qscales,
                              const float *qweights, const float *qfloor, int BtL, int L, float *scores,
                              int64_t stride) {
#ifdef HBI_X86
    if (!hbi_vnni_supported()) return 1;
    if (n_videos < 0 || T < 1 || D < 1 || BtL < 1 || L < 1 || BtL % L != 0 || stride < n_videos) return 2;
    int32_t *dots = (int32_t *)malloc(sizeof(int32_t) * (size_t)T * (size_t)BtL);
    float *sim = (float *)malloc(sizeof(float) * (size_t)T * (size_t)BtL);
    float *tmax = (float *)malloc(sizeof(float) * (size_t)BtL);
    int rc = 3;
    if (dots != NULL && sim != NULL && tmax != NULL) {
        score_videos(codes, vscales, vweights, n_videos, T, D, q, q_offset, qscales, qweights, qfloor, BtL, L,
                     scores, stride, dots, sim, tmax);
        rc = 0;
    }
    free(dots);
    free(sim);
    free(tmax);
    return rc;
#else
    (void)codes; (void)vscales; (void)vweights; (void)n_videos; (void)T; (void)D; (void)q; (void)q_offset;
    (void)qscales; (void)qweights; (void)qfloor; (void)BtL; (void)L; (void)scores; (void)stride;
    return 1;
#endif
}

static struct PyModuleDef hbi_vnni_module = {
    PyModuleDef_HEAD_INIT, "_vnni",
    "int8 scoring kernel (AVX-512 VNNI); a C library used through ctypes, see hbi_runtime/scoring/native.py",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__vnni(void) { return PyModule_Create(&hbi_vnni_module); }
