/*
 * hbi_runtime.scoring._vnni: the int8 scoring kernels of hbi_runtime.scoring (x86-64: AVX-512 VNNI, and AMX where
 * the CPU has it), plus the two loops the benchmarks measure the machine's bounds with.
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
 * hbi_runtime/scoring/engine.py up to float rounding. The dot products are exact in int32: sum_k codes * q
 * (u8 x s8), minus 128 * sum_k q.
 *
 * Layout: the stored codes are read as they lie ((videos * T, D) row-major, the on-disk layout); only the *query*
 * is packed, once per call. AVX-512 paths, by the shape (measured on AMD Zen 4, where a broadcast from memory costs
 * about as much as a vpdpbusd and the transpose-and-add tree of row-major tiles a quarter of their time):
 *   - one query of up to 16 rows (retrieve), T <= 8 and D <= 64 (the demo model's entity level, 8 x 64): the
 *     video's frames are transposed (8 x 8 pairs of 4-byte groups, 24 shuffles) so that one vpdpbusd against a
 *     query packed in row pairs gives finished dots of 8 frames x 2 rows, no reduction across lanes; two videos
 *     per step sharing the query loads (score_videos_small). The row-major tiles below spend more on their
 *     tree than on products there (one 64-byte step per tile): 391 -> 174 cycles per video in cache;
 *   - one query of up to 16 rows, other shapes: the row-major tiles below, but scored in registers
 *     (score_videos_one: no round trip of the dots and sims through memory, whose 16-byte masked stores were
 *     read back by wider loads);
 *   - up to 48 rows (a few queries): row-major tiles of 4 frames x 4 query rows, every 64-byte load feeding four
 *     vpdpbusd, summed across lanes by a transpose-and-add tree (score_videos_rows). Tried for one query and
 *     dropped: groups of 4 rows with 16-byte broadcasts of the frame and two unpack-and-add stages instead of the
 *     tree: 13 % less CPU with the videos in cache, but 1.3-1.6x slower streaming 100,000 videos from memory
 *     (before the software prefetch below); blends instead of half the tree's shuffles: no gain;
 *   - more (query batches): the VNNI-interleaved query, qpack[block][k / 4][16 rows][4 bytes]; one 4-byte group
 *     of a frame broadcast to all lanes times one qpack vector gives finished dots with 16 query rows, no
 *     reduction across lanes; 4 frames x 6 query blocks (24 accumulators) per pass over k, so that each broadcast
 *     feeds 6 vpdpbusd (GEMM-style blocking; the remaining blocks 6 frames x 4, 12 x 2, 12 x 1;
 *     video_dots_avx512).
 * The one-query and row-major paths prefetch the stored codes 12 KB ahead into L2 (HBI_PF_AHEAD); the two
 * one-query paths give scores identical to score_videos_rows' (same float operations in the same order).
 * The AMX path multiplies tiles of a video's frames (the stored rows, as they lie) by the same qpack, which is
 * exactly the B-tile layout of tdpbusd (T <= 16, D % 64 == 0; the caller falls back to AVX-512 otherwise).
 *
 * After the products (dots[t][j], int32, per video): sim = (dots - offset) * qscale, the max over frames of
 * sim * vscale (vertical: lanes = query rows), the weighted sums; the max over each query's rows per frame is a
 * masked reduction.
 *
 * It is a plain C library loaded with ctypes (the Python module init below only makes it importable, so that
 * setuptools builds it and Python finds it); ctypes releases the GIL, and the caller hands chunks of videos to its
 * threads, one call per chunk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HBI_X86 1
/* AMX intrinsics: GCC >= 11, Clang >= 12; an older compiler builds the AVX-512 paths only (AMX then reads as absent) */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define HBI_AMX_BUILD 1
#endif
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#define HBI_EXPORT __attribute__((visibility("default")))

/* kernel paths, as hbi_score_u8s8's `path` argument and hbi_paths_supported()'s bits */
#define HBI_PATH_AVX512 1
#define HBI_PATH_AMX 2

/* return codes of hbi_score_u8s8 (see native.py) */
#define HBI_OK 0
#define HBI_ENOCPU 1
#define HBI_ESIZE 2
#define HBI_ENOMEM 3
#define HBI_ENOPERM 4
#define HBI_ESHAPE 5

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
/* CPUID leaf 7 subleaf 0, EDX bit 24 = AMX-TILE, bit 25 = AMX-INT8 */
static int hbi_cpu_has_amx(void) {
    unsigned int a, b, c, d, max_leaf = 0, t1, t2, t3;
    __asm__ volatile("cpuid" : "=a"(max_leaf), "=b"(t1), "=c"(t2), "=d"(t3) : "a"(0), "c"(0));
    if (max_leaf < 7) return 0;
    a = 7; c = 0;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return ((d >> 24) & 1) && ((d >> 25) & 1);
}
#endif

/*
 * AMX state: 0 = not asked yet, 1 = usable, -1 = the CPU lacks AMX, -2 = the kernel refused the permission
 * (Linux: a process must ask for the tile data state with arch_prctl(ARCH_REQ_XCOMP_PERM) before its first
 * tile instruction, or that instruction faults; other systems: not supported here).
 */
static int hbi_amx_state = 0;

HBI_EXPORT int hbi_amx_status(void) {
#if defined(HBI_X86) && defined(__linux__) && defined(HBI_AMX_BUILD)
    if (hbi_amx_state != 0) return hbi_amx_state;
    if (!hbi_cpu_has_amx() || !hbi_vnni_supported()) {
        hbi_amx_state = -1;
        return hbi_amx_state;
    }
    /* ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 */
    long rc = syscall(SYS_arch_prctl, 0x1023, 18);
    hbi_amx_state = rc == 0 ? 1 : -2;
    return hbi_amx_state;
#else
    hbi_amx_state = -1;
    return hbi_amx_state;
#endif
}

/* which paths run here: bit HBI_PATH_AVX512, bit HBI_PATH_AMX (asks the AMX permission on first call) */
HBI_EXPORT int hbi_paths_supported(void) {
    int bits = hbi_vnni_supported() ? HBI_PATH_AVX512 : 0;
    if (bits && hbi_amx_status() == 1) bits |= HBI_PATH_AMX;
    return bits;
}

#ifdef HBI_X86
#define HBI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define HBI_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

/* acc += x (u8) . y (s8) per 4-byte group. Inline asm rather than _mm512_dpbusd_epi32: with the intrinsic, GCC 12
 * copied accumulators to other registers (and some to the stack) on every step of the dot loop; the asm operand
 * "+v" keeps each accumulator in place, as the instruction works. */
#define HBI_DP(acc, x, y) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(y))

#define FB 12 /* frames per pass over k */

/* Up to this many query rows the AVX-512 path uses the row-major microkernel (dot_tile),
 * above it the packed one: the packed kernel needs 4 or more blocks of 16 rows to feed 4 or more vpdpbusd per
 * broadcast. Measured on AMD Zen 4 (one thread, CPU time, T = 12, D = 512, 12 rows per query), against the
 * row-major tiles alone: 4 queries (48 rows) 280 vs 269 GOP/s, 8 queries 360 vs 310, 32 queries 391 vs 345. */
#define HBI_ROWS_MAX 48

static inline int32_t hbi_load32(const uint8_t *p) {
    int32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* the 4 bytes of a frame at group g as a 32-bit word; the last group of a D % 4 != 0 row is read byte by byte
 * (its missing bytes meet zero query bytes, any value would do, but reading past the array is not allowed) */
static inline int32_t hbi_word(const uint8_t *row, int g, int D) {
    int32_t w = 0;
    if (4 * g + 4 <= D) {
        memcpy(&w, row + 4 * g, 4);
    } else {
        memcpy(&w, row + 4 * g, (size_t)(D - 4 * g));
    }
    return w;
}

/*
 * dots[t * P + j] for t < nf frames (rows rows[0..nf-1]) and j in the query blocks jb, jb + 1 (P = 16 * blocks):
 * two accumulator sets of FB frames. Frames past nf repeat the last frame (their results are not stored).
 */
#define HBI_STEP2(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_load32(r##f + 4 * g));                                        \
        HBI_DP(a##f, x, q0);                                                                                  \
        HBI_DP(b##f, x, q1);                                                                                  \
    } while (0)
#define HBI_STEP1(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_load32(r##f + 4 * g));                                        \
        HBI_DP(a##f, x, q0);                                                                                  \
    } while (0)
#define HBI_TAIL2(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_word(r##f, g, D));                                            \
        HBI_DP(a##f, x, q0);                                                                                  \
        HBI_DP(b##f, x, q1);                                                                                  \
    } while (0)
#define HBI_TAIL1(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_word(r##f, g, D));                                            \
        HBI_DP(a##f, x, q0);                                                                                  \
    } while (0)
#define HBI_FOR_FRAMES(M) M(0); M(1); M(2); M(3); M(4); M(5); M(6); M(7); M(8); M(9); M(10); M(11)

HBI_TARGET static void dots_two_blocks(const uint8_t *const rows[FB], int nf, const int8_t *qa, const int8_t *qb,
                                       int D, int32_t *dots, int P) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
            a9 = a0, a10 = a0, a11 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0,
            b8 = a0, b9 = a0, b10 = a0, b11 = a0;
    const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5],
                  *r6 = rows[6], *r7 = rows[7], *r8 = rows[8], *r9 = rows[9], *r10 = rows[10], *r11 = rows[11];
    const int G = D / 4;
    for (int g = 0; g < G; g++) {
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g), q1 = _mm512_loadu_si512(qb + 64 * g);
        HBI_FOR_FRAMES(HBI_STEP2);
    }
    if (D % 4) {
        const int g = G;
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g), q1 = _mm512_loadu_si512(qb + 64 * g);
        HBI_FOR_FRAMES(HBI_TAIL2);
    }
    const __m512i av[FB] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
    const __m512i bv[FB] = {b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11};
    for (int f = 0; f < nf; f++) {
        _mm512_storeu_si512((void *)(dots + f * P), av[f]);
        _mm512_storeu_si512((void *)(dots + f * P + 16), bv[f]);
    }
}

HBI_TARGET static void dots_one_block(const uint8_t *const rows[FB], int nf, const int8_t *qa, int D,
                                      int32_t *dots, int P) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
            a9 = a0, a10 = a0, a11 = a0;
    const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5],
                  *r6 = rows[6], *r7 = rows[7], *r8 = rows[8], *r9 = rows[9], *r10 = rows[10], *r11 = rows[11];
    const int G = D / 4;
    for (int g = 0; g < G; g++) {
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g);
        HBI_FOR_FRAMES(HBI_STEP1);
    }
    if (D % 4) {
        const int g = G;
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g);
        HBI_FOR_FRAMES(HBI_TAIL1);
    }
    const __m512i av[FB] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
    for (int f = 0; f < nf; f++) _mm512_storeu_si512((void *)(dots + f * P), av[f]);
}

/*
 * The row-major microkernel, for one query or a few (up to 48 rows): dots of 4 frames x 4 query rows, D bytes each,
 * both as stored (no packing). 16 accumulators, summed across lanes together by a transpose-and-add tree (45
 * instructions for 16 dot products). The packed layout would spend one broadcast per vpdpbusd or two here (fewer
 * than 4 blocks of 16 rows); here every 64-byte load feeds four vpdpbusd.
 */
#define HBI_ADD32(x, y) _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y))
#define HBI_ADD64(x, y) _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y))
#define HBI_ADD128(x, y) _mm512_add_epi32(_mm512_shuffle_i32x4(x, y, 0x88), _mm512_shuffle_i32x4(x, y, 0xDD))

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

/* Software prefetch of the stored codes this many bytes ahead of the frames being read, into L2 (prefetcht1):
 * issued once per 64-byte line (in the row-major paths: in the first query tile of each frame tile). Measured on
 * Zen 4 streaming 100,000 videos (T = 12, D = 512, one query): 22 % less CPU time than leaving the stream to the
 * hardware prefetcher, about the same from 6 KB to 24 KB ahead; prefetching into L1 (prefetcht0) that far was slower
 * than none (and so was the earlier form, every line of the next videos at the start of each video). 1,000,000 videos
 * of 8 x 64 (score_videos_small): 37 % less CPU than none, 4-48 KB ahead alike; prefetching the scales and weights
 * too gained nothing measurable. */
#define HBI_PF_AHEAD 12288
/* and, from L2 into L1, this many bytes ahead (prefetcht0): 3-7 % less CPU streaming either shape, 1-6 KB alike */
#define HBI_PF_NEAR 2048

/* the 4 x 4 dots of a tile as one vector: 128-bit lane i = frame a[i], element j = query row b[j] */
HBI_TARGET static inline __attribute__((always_inline)) __m512i dot_tile(const uint8_t *const a[4],
                                                                         const int8_t *const b[4], int D, int pf) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
            c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
    const int8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    const int full = D & ~63;
    int k = 0;
    if (pf) {
        for (; k < full; k += 64) {
            _mm_prefetch((const char *)(a0 + k + HBI_PF_AHEAD), _MM_HINT_T1);
            _mm_prefetch((const char *)(a1 + k + HBI_PF_AHEAD), _MM_HINT_T1);
            _mm_prefetch((const char *)(a2 + k + HBI_PF_AHEAD), _MM_HINT_T1);
            _mm_prefetch((const char *)(a3 + k + HBI_PF_AHEAD), _MM_HINT_T1);
            _mm_prefetch((const char *)(a0 + k + HBI_PF_NEAR), _MM_HINT_T0);
            _mm_prefetch((const char *)(a1 + k + HBI_PF_NEAR), _MM_HINT_T0);
            _mm_prefetch((const char *)(a2 + k + HBI_PF_NEAR), _MM_HINT_T0);
            _mm_prefetch((const char *)(a3 + k + HBI_PF_NEAR), _MM_HINT_T0);
            HBI_TILE_STEP(k, ~(__mmask64)0, 1);
        }
    } else {
        for (; k < full; k += 64) HBI_TILE_STEP(k, ~(__mmask64)0, 1);
    }
    if (k < D) {
        const __mmask64 m = ((__mmask64)1 << (D - k)) - 1;
        HBI_TILE_STEP(k, m, 0);
    }
    const __m512i u0 = HBI_ADD64(HBI_ADD32(c00, c01), HBI_ADD32(c02, c03)),
                  u1 = HBI_ADD64(HBI_ADD32(c10, c11), HBI_ADD32(c12, c13)),
                  u2 = HBI_ADD64(HBI_ADD32(c20, c21), HBI_ADD32(c22, c23)),
                  u3 = HBI_ADD64(HBI_ADD32(c30, c31), HBI_ADD32(c32, c33));
    return HBI_ADD128(HBI_ADD128(u0, u1), HBI_ADD128(u2, u3));
}

/* the whole computation of the row-major path: dots of each video by tiles, then its scores */
HBI_TARGET static void score_videos_rows(const uint8_t *codes, const float *vscales, const float *vweights,
                                    int64_t n_videos, int T, int D, const int8_t *q, const int32_t *q_offset,
                                    const float *qscales, const float *qweights, const float *qfloor, int BtL, int L,
                                    float *scores, int64_t stride, int32_t *dots, float *sim, float *tmax) {
    const int Bt = BtL / L;
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    for (int64_t v = 0; v < n_videos; v++) {
        const uint8_t *vcodes = codes + v * (int64_t)T * D;
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
                _mm512_storeu_si512((void *)tile, dot_tile(a, b, D, j0 == 0));
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

/*
 * One query of up to 16 rows (retrieve): the same tiles, but nothing goes through memory between them. Each tile's
 * vector (lane 4i + j = frame t0 + i . row 4jt + j) is scaled in place; the max over frames (t2v) is kept per
 * query tile in a vector across the video, the max over rows (v2t) in one vector per frame tile, reduced within
 * 128-bit lanes. Same float operations in the same order as score_videos_rows (identical scores): the t2v products
 * are summed by the same reduction, the v2t terms one frame after another. Rows past L repeat the last row and
 * frames past T the last frame: neither changes a max, and a repeated frame adds no v2t term.
 */
HBI_TARGET static void score_videos_one(const uint8_t *codes, const float *vscales, const float *vweights,
                                        int64_t n_videos, int T, int D, const int8_t *q, const int32_t *q_offset,
                                        const float *qscales, const float *qweights, float floor_q, int L,
                                        float *scores) {
    const int NJ = (L + 3) / 4; /* query tiles, 1..4 */
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    const __mmask16 mask_l = (__mmask16)((1u << L) - 1);
    const int8_t *b[4][4];
    __m512i offv[4];
    __m512 qsv[4];
    for (int jt = 0; jt < NJ; jt++) {
        int32_t off4[4];
        float qs4[4];
        for (int j = 0; j < 4; j++) {
            const int r = 4 * jt + j < L ? 4 * jt + j : L - 1;
            b[jt][j] = q + (int64_t)r * D;
            off4[j] = q_offset[r];
            qs4[j] = qscales[r];
        }
        offv[jt] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)off4));
        qsv[jt] = _mm512_broadcast_f32x4(_mm_loadu_ps(qs4));
    }
    const __m512 qw = _mm512_maskz_loadu_ps(mask_l, qweights);
    const __m512 floorv = _mm512_set1_ps(floor_q);
    /* lane 4i + j <- frame min(i, nr - 1) of a frame tile, for nr = 1..4 */
    __m512i frame_idx[5];
    for (int nr = 1; nr <= 4; nr++) {
        int32_t idx[16];
        for (int l = 0; l < 16; l++) idx[l] = l / 4 < nr ? l / 4 : nr - 1;
        frame_idx[nr] = _mm512_loadu_si512((const void *)idx);
    }
    frame_idx[0] = frame_idx[1];
    for (int64_t v = 0; v < n_videos; v++) {
        const uint8_t *vcodes = codes + v * (int64_t)T * D;
        const float *vs = vscales + v * T, *vw = vweights + v * T;
        __m512 tmax[4] = {lowest, lowest, lowest, lowest};
        __m128 v2t = _mm_setzero_ps();
        for (int t0 = 0; t0 < T; t0 += 4) {
            const int nr = T - t0 < 4 ? T - t0 : 4;
            const __mmask16 mf = (__mmask16)((1u << nr) - 1);
            const uint8_t *a[4];
            for (int i = 0; i < 4; i++) a[i] = vcodes + (int64_t)(t0 + (i < nr ? i : nr - 1)) * D;
            const __m512 vsv = _mm512_permutexvar_ps(frame_idx[nr], _mm512_maskz_loadu_ps(mf, vs + t0));
            __m512 fmax = lowest;
            for (int jt = 0; jt < NJ; jt++) {
                const __m512i d = dot_tile(a, b[jt], D, jt == 0);
                const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, offv[jt])), qsv[jt]);
                tmax[jt] = _mm512_max_ps(tmax[jt], _mm512_mul_ps(x, vsv));
                fmax = _mm512_max_ps(fmax, x);
            }
            /* the max over the rows of each frame, to every element of its 128-bit lane */
            fmax = _mm512_max_ps(fmax, _mm512_permute_ps(fmax, 0x4E));
            fmax = _mm512_max_ps(fmax, _mm512_permute_ps(fmax, 0xB1));
            const __m512 vwv = _mm512_permutexvar_ps(frame_idx[nr], _mm512_maskz_loadu_ps(mf, vw + t0));
            /* v2t += max(row max, floor) * (vw * vs), one frame after another, fused as the compiler fuses the
             * scalar loop of score_videos_rows */
            const __m512 mx = _mm512_max_ps(fmax, floorv), pw = _mm512_mul_ps(vwv, vsv);
            v2t = _mm_mask_fmadd_ss(_mm512_castps512_ps128(mx), 1, _mm512_castps512_ps128(pw), v2t);
            if (nr > 1) v2t = _mm_mask_fmadd_ss(_mm512_extractf32x4_ps(mx, 1), 1, _mm512_extractf32x4_ps(pw, 1), v2t);
            if (nr > 2) v2t = _mm_mask_fmadd_ss(_mm512_extractf32x4_ps(mx, 2), 1, _mm512_extractf32x4_ps(pw, 2), v2t);
            if (nr > 3) v2t = _mm_mask_fmadd_ss(_mm512_extractf32x4_ps(mx, 3), 1, _mm512_extractf32x4_ps(pw, 3), v2t);
        }
        /* the max over frames: across the four 128-bit lanes, then query tile jt to lanes 4jt .. 4jt + 3 */
        __m512 tm = lowest;
        for (int jt = 0; jt < NJ; jt++) {
            __m512 m = _mm512_max_ps(tmax[jt], _mm512_shuffle_f32x4(tmax[jt], tmax[jt], 0x4E));
            m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xB1));
            tm = _mm512_mask_blend_ps((__mmask16)(0xFu << (4 * jt)), tm, m);
        }
        const __m512 t2v = _mm512_fmadd_ps(qw, _mm512_maskz_mov_ps(mask_l, tm), _mm512_setzero_ps());
        scores[v] = 0.5f * (_mm512_reduce_add_ps(t2v) + _mm_cvtss_f32(v2t));
    }
}

/*
 * One query of up to 16 rows against short, narrow videos (T <= 8 frames, D <= 64: the demo model's entity level,
 * 8 x 64), where the tiles above spend more on their transpose-and-add tree than on products (one 64-byte step
 * per tile). Here a video's frames are transposed instead of the products: the 8 frames (one 64-byte vector each)
 * become 16 vectors X_g, lane 2t + r = the 4 bytes of frame t at group g (an 8 x 8 transpose of 8-byte pairs, 24
 * shuffles, then an in-lane duplication per g); the query is packed once per call to match (qpair[p][g], lane
 * 2t + r = row 2p + r at group g), so vpdpbusd(X_g, qpair[p][g]) over g leaves finished dot products of 8 frames x
 * 2 rows in one vector, with no reduction across lanes. Scores as score_videos_one (same float operations in the
 * same order: identical results).
 */
#define HBI_T2(a, b, lo, hi)                                                                                  \
    do {                                                                                                      \
        lo = _mm512_unpacklo_epi64(a, b);                                                                     \
        hi = _mm512_unpackhi_epi64(a, b);                                                                     \
    } while (0)

HBI_TARGET static inline __attribute__((always_inline)) void score_videos_small_np(
    const uint8_t *codes, const float *vscales, const float *vweights, int64_t n_videos, int T, int D,
    const int8_t *qpair, const int NP, const int32_t *q_offset, const float *qscales, const float *qweights,
    float floor_q, int L, float *scores) {
    /* NP is a constant in each caller (score_videos_small), so that the loops over row pairs unroll and the
     * accumulators stay in registers (with a variable count GCC kept them on the stack) */
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    const __mmask16 mask_l = (__mmask16)((1u << L) - 1);
    const __mmask64 mask_d = D >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << D) - 1);
    const __mmask16 mask_t = (__mmask16)((1u << T) - 1);
    __m512i offv[8];
    __m512 qsv[8];
    int32_t idx_t[16];
    for (int l = 0; l < 16; l++) {
        idx_t[l] = l / 2 < T ? l / 2 : T - 1; /* lane 2t + r <- frame min(t, T - 1) */
    }
    for (int pp = 0; pp < NP; pp++) {
        int32_t off16[16];
        float qs16[16];
        for (int l = 0; l < 16; l++) {
            const int r = 2 * pp + l % 2 < L ? 2 * pp + l % 2 : L - 1;
            off16[l] = q_offset[r];
            qs16[l] = qscales[r];
        }
        offv[pp] = _mm512_loadu_si512((const void *)off16);
        qsv[pp] = _mm512_loadu_ps(qs16);
    }
    const __m512i frame_dup = _mm512_loadu_si512((const void *)idx_t);
    const __m512 qw = _mm512_maskz_loadu_ps(mask_l, qweights);
    const __m512 floorv = _mm512_set1_ps(floor_q);
    const int64_t vbytes = (int64_t)T * D;
    /* two videos per step, sharing each load of the query (and giving the out-of-order core two independent
     * chains); an odd last video is scored alone as the pair (v, v) */
    for (int64_t v = 0; v < n_videos; v += 2) {
        const int64_t vid[2] = {v, v + 1 < n_videos ? v + 1 : v};
        __m512i w[2][8];
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) {
            const uint8_t *vcodes = codes + vid[u] * vbytes;
            for (int64_t o = 0; o < vbytes; o += 64) {
                _mm_prefetch((const char *)(vcodes + o + HBI_PF_AHEAD), _MM_HINT_T1);
                _mm_prefetch((const char *)(vcodes + o + HBI_PF_NEAR), _MM_HINT_T0);
            }
            __m512i f[8];
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++)
                f[t] = _mm512_maskz_loadu_epi8(mask_d, vcodes + (int64_t)(t < T ? t : T - 1) * D);
            /* 8 x 8 transpose of 8-byte pairs: w[h] lane pair t = frame t's bytes 8h .. 8h + 7 */
            __m512i t0, t1, t2, t3, t4, t5, t6, t7, s0, s1, s2, s3;
            HBI_T2(f[0], f[1], t0, t1);
            HBI_T2(f[2], f[3], t2, t3);
            HBI_T2(f[4], f[5], t4, t5);
            HBI_T2(f[6], f[7], t6, t7);
            s0 = _mm512_shuffle_i64x2(t0, t2, 0x88);
            s1 = _mm512_shuffle_i64x2(t0, t2, 0xDD);
            s2 = _mm512_shuffle_i64x2(t4, t6, 0x88);
            s3 = _mm512_shuffle_i64x2(t4, t6, 0xDD);
            w[u][0] = _mm512_shuffle_i64x2(s0, s2, 0x88);
            w[u][4] = _mm512_shuffle_i64x2(s0, s2, 0xDD);
            w[u][2] = _mm512_shuffle_i64x2(s1, s3, 0x88);
            w[u][6] = _mm512_shuffle_i64x2(s1, s3, 0xDD);
            s0 = _mm512_shuffle_i64x2(t1, t3, 0x88);
            s1 = _mm512_shuffle_i64x2(t1, t3, 0xDD);
            s2 = _mm512_shuffle_i64x2(t5, t7, 0x88);
            s3 = _mm512_shuffle_i64x2(t5, t7, 0xDD);
            w[u][1] = _mm512_shuffle_i64x2(s0, s2, 0x88);
            w[u][5] = _mm512_shuffle_i64x2(s0, s2, 0xDD);
            w[u][3] = _mm512_shuffle_i64x2(s1, s3, 0x88);
            w[u][7] = _mm512_shuffle_i64x2(s1, s3, 0xDD);
        }
        __m512i acc[2][8];
#pragma GCC unroll 8
        for (int pp = 0; pp < 8; pp++) acc[0][pp] = acc[1][pp] = _mm512_setzero_si512();
        /* all 16 groups (past D: zero bytes on both sides) */
#pragma GCC unroll 16
        for (int g = 0; g < 16; g++) {
            const __m512 w0 = _mm512_castsi512_ps(w[0][g / 2]), w1 = _mm512_castsi512_ps(w[1][g / 2]);
            const __m512i x0 = _mm512_castps_si512(g % 2 ? _mm512_movehdup_ps(w0) : _mm512_moveldup_ps(w0));
            const __m512i x1 = _mm512_castps_si512(g % 2 ? _mm512_movehdup_ps(w1) : _mm512_moveldup_ps(w1));
            const int8_t *qg = qpair + 64 * g;
#pragma GCC unroll 8
            for (int pp = 0; pp < NP; pp++) {
                const __m512i qv = _mm512_load_si512(qg + pp * 16 * 64);
                HBI_DP(acc[0][pp], x0, qv);
                HBI_DP(acc[1][pp], x1, qv);
            }
        }
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) {
            const __m512 vsd = _mm512_permutexvar_ps(frame_dup, _mm512_maskz_loadu_ps(mask_t, vscales + vid[u] * T));
            const __m512 vwd = _mm512_permutexvar_ps(frame_dup, _mm512_maskz_loadu_ps(mask_t, vweights + vid[u] * T));
            __m512 fmax = lowest, m[8];
#pragma GCC unroll 8
            for (int pp = 0; pp < NP; pp++) {
                const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[u][pp], offv[pp])), qsv[pp]);
                fmax = _mm512_max_ps(fmax, x);
                m[pp] = _mm512_mul_ps(x, vsd);
            }
            /* t2v: the max over the 8 frames (lane pairs) of x * vs, row j to lane j, as a merging tree: pairs of
             * row pairs share one 128-bit lane after the first step (qwords = frames 2k, 2k + 1 of 128-bit lane k),
             * then the 128-bit lanes are folded; rows past 2 NP repeat the last pair (masked by mask_l below) */
            __m512 c[4], e[2];
#pragma GCC unroll 4
            for (int a = 0; a < (NP + 1) / 2; a++) {
                const __m512d pa = _mm512_castps_pd(m[2 * a]), pb = _mm512_castps_pd(m[2 * a + 1 < NP ? 2 * a + 1 : NP - 1]);
                c[a] = _mm512_max_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(pa, pb)), _mm512_castpd_ps(_mm512_unpackhi_pd(pa, pb)));
            }
#pragma GCC unroll 2
            for (int b = 0; b < (NP + 3) / 4; b++) {
                const __m512 ca = c[2 * b], cb = c[2 * b + 1 < (NP + 1) / 2 ? 2 * b + 1 : 2 * b];
                const __m512 h = _mm512_max_ps(_mm512_shuffle_f32x4(ca, cb, 0x88), _mm512_shuffle_f32x4(ca, cb, 0xDD));
                e[b] = _mm512_max_ps(h, _mm512_shuffle_f32x4(h, h, 0xB1));
            }
            const __m512 tm = _mm512_shuffle_f32x4(e[0], e[NP > 4 ? 1 : 0], 0x88);
            /* v2t: the max over rows of each frame (lanes 2t, 2t + 1), raised to the floor, times vw * vs, added one
             * frame after another (frames 2k, 2k + 1 are elements 0 and 2 of 128-bit lane k) */
            fmax = _mm512_max_ps(fmax, _mm512_permute_ps(fmax, 0xB1));
            const __m512 mxv = _mm512_max_ps(fmax, floorv), pwv = _mm512_mul_ps(vwd, vsd);
            __m128 v2t = _mm_setzero_ps();
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                if (2 * k >= T) break;
                const __m128 mk = _mm512_extractf32x4_ps(mxv, k), pk = _mm512_extractf32x4_ps(pwv, k);
                v2t = _mm_mask_fmadd_ss(mk, 1, pk, v2t);
                if (2 * k + 1 < T) v2t = _mm_mask_fmadd_ss(_mm_movehl_ps(mk, mk), 1, _mm_movehl_ps(pk, pk), v2t);
            }
            const __m512 t2v = _mm512_fmadd_ps(qw, _mm512_maskz_mov_ps(mask_l, tm), _mm512_setzero_ps());
            scores[vid[u]] = 0.5f * (_mm512_reduce_add_ps(t2v) + _mm_cvtss_f32(v2t));
        }
    }
}

HBI_TARGET static void score_videos_small(const uint8_t *codes, const float *vscales, const float *vweights,
                                          int64_t n_videos, int T, int D, const int8_t *qpair, int NP,
                                          const int32_t *q_offset, const float *qscales, const float *qweights,
                                          float floor_q, int L, float *scores) {
#define HBI_SMALL(n)                                                                                          \
    case n:                                                                                                   \
        score_videos_small_np(codes, vscales, vweights, n_videos, T, D, qpair, n, q_offset, qscales, qweights,  \
                              floor_q, L, scores);                                                            \
        break
    switch (NP) {
        HBI_SMALL(1); HBI_SMALL(2); HBI_SMALL(3); HBI_SMALL(4); HBI_SMALL(5); HBI_SMALL(6); HBI_SMALL(7);
        default: HBI_SMALL(8);
    }
#undef HBI_SMALL
}

/* query rows (L <= 16, D <= 64) -> qpair[p][g][16 lanes][4 bytes]: lane 2t + r = row min(2p + r, L - 1), bytes
 * 4g .. 4g + 3 (zero past D), for every t */
static void pack_query_pairs(const int8_t *q, int L, int D, int8_t *qpair, int NP, int G) {
    memset(qpair, 0, (size_t)NP * (size_t)G * 64);
    for (int pp = 0; pp < NP; pp++)
        for (int g = 0; g < G; g++)
            for (int l = 0; l < 16; l++) {
                const int r = 2 * pp + l % 2 < L ? 2 * pp + l % 2 : L - 1;
                for (int c = 0; c < 4 && 4 * g + c < D; c++)
                    qpair[((int64_t)pp * G + g) * 64 + 4 * l + c] = q[(int64_t)r * D + 4 * g + c];
            }
}

/* 6 frames x 4 query blocks (24 accumulators): each broadcast feeds 4 vpdpbusd (a broadcast from memory costs
 * about as much as a vpdpbusd on AMD Zen 4, so the more blocks per broadcast the better) */
#define FB4 6
#define HBI_STEP4(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_load32(r##f + 4 * g));                                        \
        HBI_DP(a##f, x, q0);                                                                                  \
        HBI_DP(b##f, x, q1);                                                                                  \
        HBI_DP(c##f, x, q2);                                                                                  \
        HBI_DP(d##f, x, q3);                                                                                  \
    } while (0)
#define HBI_TAIL4(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_word(r##f, g, D));                                            \
        HBI_DP(a##f, x, q0);                                                                                  \
        HBI_DP(b##f, x, q1);                                                                                  \
        HBI_DP(c##f, x, q2);                                                                                  \
        HBI_DP(d##f, x, q3);                                                                                  \
    } while (0)
#define HBI_FOR_6(M) M(0); M(1); M(2); M(3); M(4); M(5)

HBI_TARGET static void dots_four_blocks(const uint8_t *const rows[FB4], int nf, const int8_t *qblk,
                                        int64_t block_bytes, int D, int32_t *dots, int P) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, b0 = a0, b1 = a0, b2 = a0,
            b3 = a0, b4 = a0, b5 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0, c4 = a0, c5 = a0, d0 = a0, d1 = a0,
            d2 = a0, d3 = a0, d4 = a0, d5 = a0;
    const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5];
    const int8_t *qa = qblk, *qb = qblk + block_bytes, *qc = qblk + 2 * block_bytes, *qd = qblk + 3 * block_bytes;
    const int G = D / 4;
    for (int g = 0; g < G; g++) {
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g), q1 = _mm512_loadu_si512(qb + 64 * g),
                      q2 = _mm512_loadu_si512(qc + 64 * g), q3 = _mm512_loadu_si512(qd + 64 * g);
        HBI_FOR_6(HBI_STEP4);
    }
    if (D % 4) {
        const int g = G;
        const __m512i q0 = _mm512_loadu_si512(qa + 64 * g), q1 = _mm512_loadu_si512(qb + 64 * g),
                      q2 = _mm512_loadu_si512(qc + 64 * g), q3 = _mm512_loadu_si512(qd + 64 * g);
        HBI_FOR_6(HBI_TAIL4);
    }
    const __m512i av[FB4] = {a0, a1, a2, a3, a4, a5}, bv[FB4] = {b0, b1, b2, b3, b4, b5},
                  cv[FB4] = {c0, c1, c2, c3, c4, c5}, dv[FB4] = {d0, d1, d2, d3, d4, d5};
    for (int f = 0; f < nf; f++) {
        _mm512_storeu_si512((void *)(dots + f * P), av[f]);
        _mm512_storeu_si512((void *)(dots + f * P + 16), bv[f]);
        _mm512_storeu_si512((void *)(dots + f * P + 32), cv[f]);
        _mm512_storeu_si512((void *)(dots + f * P + 48), dv[f]);
    }
}

/* 4 frames x 6 query blocks (24 accumulators): each broadcast feeds 6 vpdpbusd */
#define FB6 4
#define HBI_STEP6(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_load32(r##f + 4 * g));                                        \
        HBI_DP(a##f, x, q0); HBI_DP(b##f, x, q1); HBI_DP(c##f, x, q2);                                        \
        HBI_DP(d##f, x, q3); HBI_DP(e##f, x, q4); HBI_DP(h##f, x, q5);                                        \
    } while (0)
#define HBI_TAIL6(f)                                                                                          \
    do {                                                                                                      \
        const __m512i x = _mm512_set1_epi32(hbi_word(r##f, g, D));                                            \
        HBI_DP(a##f, x, q0); HBI_DP(b##f, x, q1); HBI_DP(c##f, x, q2);                                        \
        HBI_DP(d##f, x, q3); HBI_DP(e##f, x, q4); HBI_DP(h##f, x, q5);                                        \
    } while (0)
#define HBI_FOR_4(M) M(0); M(1); M(2); M(3)
#define HBI_Q6(g)                                                                                             \
    const __m512i q0 = _mm512_loadu_si512(qblk + 64 * (g)),                                                   \
                  q1 = _mm512_loadu_si512(qblk + block_bytes + 64 * (g)),                                     \
                  q2 = _mm512_loadu_si512(qblk + 2 * block_bytes + 64 * (g)),                                 \
                  q3 = _mm512_loadu_si512(qblk + 3 * block_bytes + 64 * (g)),                                 \
                  q4 = _mm512_loadu_si512(qblk + 4 * block_bytes + 64 * (g)),                                 \
                  q5 = _mm512_loadu_si512(qblk + 5 * block_bytes + 64 * (g))

HBI_TARGET static void dots_six_blocks(const uint8_t *const rows[FB6], int nf, const int8_t *qblk,
                                       int64_t block_bytes, int D, int32_t *dots, int P) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0 = a0,
            c1 = a0, c2 = a0, c3 = a0, d0 = a0, d1 = a0, d2 = a0, d3 = a0, e0 = a0, e1 = a0, e2 = a0, e3 = a0,
            h0 = a0, h1 = a0, h2 = a0, h3 = a0;
    const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    const int G = D / 4;
    for (int g = 0; g < G; g++) {
        HBI_Q6(g);
        HBI_FOR_4(HBI_STEP6);
    }
    if (D % 4) {
        const int g = G;
        HBI_Q6(g);
        HBI_FOR_4(HBI_TAIL6);
    }
    const __m512i av[FB6] = {a0, a1, a2, a3}, bv[FB6] = {b0, b1, b2, b3}, cv[FB6] = {c0, c1, c2, c3},
                  dv[FB6] = {d0, d1, d2, d3}, ev[FB6] = {e0, e1, e2, e3}, hv[FB6] = {h0, h1, h2, h3};
    for (int f = 0; f < nf; f++) {
        int32_t *o = dots + f * P;
        _mm512_storeu_si512((void *)o, av[f]);
        _mm512_storeu_si512((void *)(o + 16), bv[f]);
        _mm512_storeu_si512((void *)(o + 32), cv[f]);
        _mm512_storeu_si512((void *)(o + 48), dv[f]);
        _mm512_storeu_si512((void *)(o + 64), ev[f]);
        _mm512_storeu_si512((void *)(o + 80), hv[f]);
    }
}

/* the products of one video with every query block, AVX-512: dots[t * P + j] */
HBI_TARGET static void video_dots_avx512(const uint8_t *vcodes, int T, int D, const int8_t *qpack, int NB,
                                         int64_t block_bytes, int32_t *dots) {
    const int P = 16 * NB;
    int jb = 0;
    /* groups of 6 query blocks: 4 frames per pass over k */
    for (; jb + 6 <= NB; jb += 6) {
        for (int t0 = 0; t0 < T; t0 += FB6) {
            const int nf = T - t0 < FB6 ? T - t0 : FB6;
            const uint8_t *rows[FB6];
            for (int f = 0; f < FB6; f++) rows[f] = vcodes + (int64_t)(t0 + (f < nf ? f : nf - 1)) * D;
            dots_six_blocks(rows, nf, qpack + jb * block_bytes, block_bytes, D, dots + t0 * P + 16 * jb, P);
        }
    }
    /* groups of 4 query blocks: 6 frames per pass over k */
    for (; jb + 4 <= NB; jb += 4) {
        for (int t0 = 0; t0 < T; t0 += FB4) {
            const int nf = T - t0 < FB4 ? T - t0 : FB4;
            const uint8_t *rows[FB4];
            for (int f = 0; f < FB4; f++) rows[f] = vcodes + (int64_t)(t0 + (f < nf ? f : nf - 1)) * D;
            dots_four_blocks(rows, nf, qpack + jb * block_bytes, block_bytes, D, dots + t0 * P + 16 * jb, P);
        }
    }
    /* the rest: 12 frames per pass, 2 or 1 query blocks */
    for (int t0 = 0; t0 < T && jb < NB; t0 += FB) {
        const int nf = T - t0 < FB ? T - t0 : FB;
        const uint8_t *rows[FB];
        for (int f = 0; f < FB; f++) rows[f] = vcodes + (int64_t)(t0 + (f < nf ? f : nf - 1)) * D;
        int j = jb;
        for (; j + 2 <= NB; j += 2)
            dots_two_blocks(rows, nf, qpack + j * block_bytes, qpack + (j + 1) * block_bytes, D,
                            dots + t0 * P + 16 * j, P);
        if (j < NB) dots_one_block(rows, nf, qpack + j * block_bytes, D, dots + t0 * P + 16 * j, P);
    }
}

/*
 * From the dots of one video to its scores (see the header): sim and the max over frames run over 16 query rows
 * per vector; the max over each query's rows is a masked reduction per frame.
 */
HBI_TARGET static void video_scores(const int32_t *dots, int T, int P, const float *vs, const float *vw,
                                    const int32_t *q_offset, const float *qscales, const float *qweights,
                                    const float *qfloor, int BtL, int L, float *sim, float *tmax, float *scores,
                                    int64_t stride, int64_t v) {
    const int Bt = BtL / L;
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < P; j0 += 16) {
        const __m512i off = _mm512_loadu_si512((const void *)(q_offset + j0));
        const __m512 qs = _mm512_loadu_ps(qscales + j0);
        __m512 best = lowest;
        for (int t = 0; t < T; t++) {
            const __m512i d = _mm512_loadu_si512((const void *)(dots + t * P + j0));
            const __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d, off)), qs);
            _mm512_storeu_ps(sim + t * P + j0, x);
            best = _mm512_max_ps(best, _mm512_mul_ps(x, _mm512_set1_ps(vs[t])));
        }
        _mm512_storeu_ps(tmax + j0, _mm512_mul_ps(best, _mm512_loadu_ps(qweights + j0)));
    }
    for (int bq = 0; bq < Bt; bq++) {
        float t2v = 0.0f;
        for (int l = 0; l < L; l++) t2v += tmax[bq * L + l];
        float v2t = 0.0f;
        const float floor_b = qfloor[bq];
        for (int t = 0; t < T; t++) {
            const float *row = sim + t * P + bq * L;
            __m512 best = lowest;
            for (int l0 = 0; l0 < L; l0 += 16) {
                const __mmask16 m = L - l0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - l0)) - 1);
                best = _mm512_max_ps(best, _mm512_mask_loadu_ps(lowest, m, row + l0));
            }
            const float m = _mm512_reduce_max_ps(best);
            v2t += (m > floor_b ? m : floor_b) * (vw[t] * vs[t]);
        }
        scores[bq * stride + v] = 0.5f * (t2v + v2t);
    }
}

#ifdef HBI_AMX_BUILD
/* AMX: tile config (64 bytes): palette 1; tiles 0, 1 = C (rows x 64 B), 2 = A (rows x 64 B), 3, 4 = B (16 x 64 B) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} hbi_tilecfg;

HBI_AMX_TARGET static void video_dots_amx(const uint8_t *vcodes, int T, int D, const int8_t *qpack, int NB,
                                          int64_t block_bytes, int32_t *dots) {
    /* T <= 16 and D % 64 == 0 (checked by the caller): one A tile of T rows per 64 bytes of k */
    const int P = 16 * NB;
    int jb = 0;
    for (; jb + 2 <= NB; jb += 2) {
        _tile_zero(0);
        _tile_zero(1);
        for (int k = 0; k < D; k += 64) {
            _tile_loadd(2, vcodes + k, D);
            _tile_loadd(3, qpack + jb * block_bytes + 16 * k, 64);
            _tile_loadd(4, qpack + (jb + 1) * block_bytes + 16 * k, 64);
            _tile_dpbusd(0, 2, 3);
            _tile_dpbusd(1, 2, 4);
        }
        _tile_stored(0, dots + 16 * jb, 4 * P);
        _tile_stored(1, dots + 16 * (jb + 1), 4 * P);
    }
    if (jb < NB) {
        _tile_zero(0);
        for (int k = 0; k < D; k += 64) {
            _tile_loadd(2, vcodes + k, D);
            _tile_loadd(3, qpack + jb * block_bytes + 16 * k, 64);
            _tile_dpbusd(0, 2, 3);
        }
        _tile_stored(0, dots + 16 * jb, 4 * P);
    }
    (void)T;
}

HBI_AMX_TARGET static void amx_configure(int T) {
    hbi_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 5; i++) cfg.colsb[i] = 64;
    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = (uint8_t)T;
    cfg.rows[3] = cfg.rows[4] = 16;
    _tile_loadconfig(&cfg);
}

HBI_AMX_TARGET static void amx_release(void) { _tile_release(); }
#endif
#ifndef HBI_AMX_BUILD
/* no AMX intrinsics in this compiler: never called (hbi_amx_status() says the CPU lacks AMX) */
static void video_dots_amx(const uint8_t *vcodes, int T, int D, const int8_t *qpack, int NB, int64_t block_bytes,
                           int32_t *dots) {
    (void)vcodes; (void)T; (void)D; (void)qpack; (void)NB; (void)block_bytes; (void)dots;
}
static void amx_configure(int T) { (void)T; }
static void amx_release(void) {}
#endif

HBI_TARGET static void score_videos(const uint8_t *codes, const float *vscales, const float *vweights,
                                    int64_t n_videos, int T, int D, const int8_t *qpack, int NB,
                                    int64_t block_bytes, const int32_t *q_offset, const float *qscales,
                                    const float *qweights, const float *qfloor, int BtL, int L, float *scores,
                                    int64_t stride, int32_t *dots, float *sim, float *tmax, int path) {
    const int P = 16 * NB;
    for (int64_t v = 0; v < n_videos; v++) {
        const uint8_t *vcodes = codes + v * (int64_t)T * D;
        /* no software prefetch: the hardware prefetcher follows this sequential stream */
        if (path == HBI_PATH_AMX)
            video_dots_amx(vcodes, T, D, qpack, NB, block_bytes, dots);
        else
            video_dots_avx512(vcodes, T, D, qpack, NB, block_bytes, dots);
        video_scores(dots, T, P, vscales + v * T, vweights + v * T, q_offset, qscales, qweights, qfloor, BtL, L,
                     sim, tmax, scores, stride, v);
    }
}

/* query rows (BtL, D) s8 -> qpack[BtL / 16 rounded up][ceil(D / 4)][16][4], zero-padded (4 bytes at a time) */
static void pack_query(const int8_t *q, int BtL, int D, int8_t *qpack, int NB, int G4) {
    memset(qpack, 0, (size_t)NB * (size_t)G4 * 64);
    for (int j = 0; j < BtL; j++) {
        int8_t *block = qpack + (int64_t)(j / 16) * G4 * 64 + 4 * (j % 16);
        const int8_t *row = q + (int64_t)j * D;
        int k = 0;
        for (; k + 4 <= D; k += 4) memcpy(block + (k / 4) * 64, row + k, 4);
        for (; k < D; k++) block[(k / 4) * 64 + (k % 4)] = row[k];
    }
}
#endif

/*
 * codes (n_videos*T, D) u8 with zero point 128; vscales, vweights (n_videos*T,); q (BtL, D) s8; q_offset (BtL,) =
 * 128 * sum_k q[j, k]; qscales, qweights (BtL,); qfloor (BtL / L,), each query's least max over its rows;
 * writes scores[b * stride + v] for b < BtL / L, v < n_videos. path: HBI_PATH_AVX512 or HBI_PATH_AMX.
 * Returns HBI_OK, HBI_ENOCPU (the CPU lacks the path's instructions), HBI_ESIZE (bad sizes), HBI_ENOMEM,
 * HBI_ENOPERM (the OS refused the AMX tile state) or HBI_ESHAPE (AMX: needs T <= 16 and D % 64 == 0).
 */
HBI_EXPORT int hbi_score_u8s8(const uint8_t *codes, const float *vscales, const float *vweights, int64_t n_videos,
                              int T, int D, const int8_t *q, const int32_t *q_offset, const float *qscales,
                              const float *qweights, const float *qfloor, int BtL, int L, float *scores,
                              int64_t stride, int path) {
#ifdef HBI_X86
    if (!hbi_vnni_supported()) return HBI_ENOCPU;
    if (n_videos < 0 || T < 1 || D < 1 || BtL < 1 || L < 1 || BtL % L != 0 || stride < n_videos) return HBI_ESIZE;
    if (path != HBI_PATH_AVX512 && path != HBI_PATH_AMX) return HBI_ESIZE;
    if (path == HBI_PATH_AMX) {
        const int st = hbi_amx_status();
        if (st == -1) return HBI_ENOCPU;
        if (st != 1) return HBI_ENOPERM;
        if (T > 16 || D % 64 != 0) return HBI_ESHAPE;
    }
    const int NB = (BtL + 15) / 16, P = 16 * NB, G4 = (D + 3) / 4;
    const int64_t block_bytes = (int64_t)G4 * 64;
    int8_t *qpack = (int8_t *)aligned_alloc(64, (size_t)NB * (size_t)block_bytes);
    int32_t *qoff = (int32_t *)aligned_alloc(64, sizeof(int32_t) * (size_t)P);
    float *qs = (float *)aligned_alloc(64, sizeof(float) * (size_t)P);
    float *qw = (float *)aligned_alloc(64, sizeof(float) * (size_t)P);
    int32_t *dots = (int32_t *)aligned_alloc(64, sizeof(int32_t) * (size_t)(T + FB) * (size_t)P);
    float *sim = (float *)aligned_alloc(64, sizeof(float) * (size_t)T * (size_t)P);
    float *tmax = (float *)aligned_alloc(64, sizeof(float) * (size_t)P);
    int rc = HBI_ENOMEM;
    if (qpack && qoff && qs && qw && dots && sim && tmax) {
        if (path == HBI_PATH_AMX || BtL > HBI_ROWS_MAX) pack_query(q, BtL, D, qpack, NB, G4); /* its users */
        memset(qoff, 0, sizeof(int32_t) * (size_t)P);
        memset(qs, 0, sizeof(float) * (size_t)P);
        memset(qw, 0, sizeof(float) * (size_t)P);
        memcpy(qoff, q_offset, sizeof(int32_t) * (size_t)BtL);
        memcpy(qs, qscales, sizeof(float) * (size_t)BtL);
        memcpy(qw, qweights, sizeof(float) * (size_t)BtL);
        if (path == HBI_PATH_AVX512 && BtL == L && L <= 16 && T <= 8 && D <= 64) {
            const int NP = (L + 1) / 2;
            int8_t *qpair = (int8_t *)aligned_alloc(64, (size_t)NP * 16 * 64);
            if (!qpair) goto done;
            pack_query_pairs(q, L, D, qpair, NP, 16);
            score_videos_small(codes, vscales, vweights, n_videos, T, D, qpair, NP, q_offset, qscales, qweights,
                               qfloor[0], L, scores);
            free(qpair);
            rc = HBI_OK;
            goto done;
        }
        if (path == HBI_PATH_AVX512 && BtL == L && L <= 16) {
            score_videos_one(codes, vscales, vweights, n_videos, T, D, q, q_offset, qscales, qweights, qfloor[0], L,
                             scores);
            rc = HBI_OK;
            goto done;
        }
        if (path == HBI_PATH_AVX512 && BtL <= HBI_ROWS_MAX) {
            score_videos_rows(codes, vscales, vweights, n_videos, T, D, q, q_offset, qscales, qweights, qfloor, BtL,
                              L, scores, stride, dots, sim, tmax);
            rc = HBI_OK;
            goto done;
        }
        if (path == HBI_PATH_AMX) amx_configure(T);
        score_videos(codes, vscales, vweights, n_videos, T, D, qpack, NB, block_bytes, qoff, qs, qw, qfloor, BtL,
                     L, scores, stride, dots, sim, tmax, path);
        if (path == HBI_PATH_AMX) amx_release();
        rc = HBI_OK;
    }
done:
    free(qpack);
    free(qoff);
    free(qs);
    free(qw);
    free(dots);
    free(sim);
    free(tmax);
    return rc;
#else
    (void)codes; (void)vscales; (void)vweights; (void)n_videos; (void)T; (void)D; (void)q; (void)q_offset;
    (void)qscales; (void)qweights; (void)qfloor; (void)BtL; (void)L; (void)scores; (void)stride; (void)path;
    return HBI_ENOCPU;
#endif
}

/*
 * The machine's bounds, measured the way the kernels run (the caller runs one call per thread):
 * hbi_vnni_loop: `iters` x 24 independent register-to-register vpdpbusd (zmm), 64 u8 x s8 products each;
 * hbi_amx_loop: `iters` x 4 independent tdpbusd (16 x 64 x 16 products each) on register tiles;
 * hbi_read_stream: reads `n` bytes (n % 256 == 0) with 64-byte loads, as the scoring kernel streams the store.
 * Each returns a value derived from its work so that nothing is optimised away (-1: not supported here).
 */
#ifdef HBI_X86
HBI_TARGET static int64_t vnni_loop(int64_t iters) {
    /* named accumulators, as in the kernel: an array of them is kept on the stack by GCC */
    __m512i c0 = _mm512_set1_epi32(1), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
            c9 = c0, c10 = c0, c11 = c0, c12 = c0, c13 = c0, c14 = c0, c15 = c0, c16 = c0, c17 = c0, c18 = c0,
            c19 = c0, c20 = c0, c21 = c0, c22 = c0, c23 = c0;
    __m512i x = _mm512_set1_epi32(0x01020304), y = _mm512_set1_epi32(0x01FF01FF);
    __asm__("" : "+v"(x), "+v"(y)); /* opaque operands: the loop cannot be folded */
    for (int64_t it = 0; it < iters; it++) {
        HBI_DP(c0, x, y); HBI_DP(c1, x, y); HBI_DP(c2, x, y); HBI_DP(c3, x, y); HBI_DP(c4, x, y);
        HBI_DP(c5, x, y); HBI_DP(c6, x, y); HBI_DP(c7, x, y); HBI_DP(c8, x, y); HBI_DP(c9, x, y);
        HBI_DP(c10, x, y); HBI_DP(c11, x, y); HBI_DP(c12, x, y); HBI_DP(c13, x, y); HBI_DP(c14, x, y);
        HBI_DP(c15, x, y); HBI_DP(c16, x, y); HBI_DP(c17, x, y); HBI_DP(c18, x, y); HBI_DP(c19, x, y);
        HBI_DP(c20, x, y); HBI_DP(c21, x, y); HBI_DP(c22, x, y); HBI_DP(c23, x, y);
    }
    const __m512i s = _mm512_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                         _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7))),
        _mm512_add_epi32(
            _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)),
                             _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15))),
            _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c16, c17), _mm512_add_epi32(c18, c19)),
                             _mm512_add_epi32(_mm512_add_epi32(c20, c21), _mm512_add_epi32(c22, c23)))));
    return _mm512_reduce_add_epi32(s);
}

#ifdef HBI_AMX_BUILD
HBI_AMX_TARGET static int64_t amx_loop(int64_t iters) {
    hbi_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 6; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = 16;
    }
    _tile_loadconfig(&cfg);
    static int8_t buf[16 * 64] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 64; i++) buf[i] = (int8_t)(i % 7);
    _tile_loadd(4, buf, 64);
    _tile_loadd(5, buf, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t it = 0; it < iters; it++) {
        _tile_dpbusd(0, 4, 5);
        _tile_dpbusd(1, 4, 5);
        _tile_dpbusd(2, 4, 5);
        _tile_dpbusd(3, 4, 5);
    }
    int32_t out[16 * 16];
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}
#endif

HBI_TARGET static int64_t read_stream(const uint8_t *p, int64_t n) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i + 256 <= n; i += 256) {
        s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p + i + 64));
        s2 = _mm512_xor_si512(s2, _mm512_loadu_si512(p + i + 128));
        s3 = _mm512_xor_si512(s3, _mm512_loadu_si512(p + i + 192));
    }
    return _mm512_reduce_add_epi32(_mm512_xor_si512(_mm512_xor_si512(s0, s1), _mm512_xor_si512(s2, s3)));
}
#endif

HBI_EXPORT int64_t hbi_vnni_loop(int64_t iters) {
#ifdef HBI_X86
    return hbi_vnni_supported() ? vnni_loop(iters) : -1;
#else
    (void)iters;
    return -1;
#endif
}

HBI_EXPORT int64_t hbi_amx_loop(int64_t iters) {
#if defined(HBI_X86) && defined(HBI_AMX_BUILD)
    return hbi_amx_status() == 1 ? amx_loop(iters) : -1;
#else
    (void)iters;
    return -1;
#endif
}

HBI_EXPORT int64_t hbi_read_stream(const uint8_t *p, int64_t n) {
#ifdef HBI_X86
    return hbi_vnni_supported() ? read_stream(p, n) : -1;
#else
    (void)p; (void)n;
    return -1;
#endif
}

static struct PyModuleDef hbi_vnni_module = {
    PyModuleDef_HEAD_INIT, "_vnni",
    "int8 scoring kernels (AVX-512 VNNI, AMX); a C library used through ctypes, see hbi_runtime/scoring/native.py",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__vnni(void) { return PyModule_Create(&hbi_vnni_module); }
