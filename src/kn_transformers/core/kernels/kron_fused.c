/*
 * The A-stage of a Kronecker product with a small B, with the output interleave fused.
 *
 *   y[n, o] = bias[o] + sum_k Ad[k, o] * t[n, k, o % m2]      o < M = m1*m2, k < K
 *
 * where t = the B-stage output (N, K, m2) and Ad[k, i1*m2 + i2] = A[i1, k] (A's columns
 * repeated m2 times, so each 16-lane vector covers 16/m2 rows of A and all m2 columns of B).
 *
 * Why: with a small B (m2 = 2..16) every BLAS formulation either runs N tiny matmuls or
 * computes (N, m2, m1) and transposes the whole output into (N, m1, m2) order. Here one
 * FMA per 16 output lanes multiplies a row of Ad by the m2 values of t broadcast to all
 * lanes, and the result lands in its final place: no transpose, no wasted products, the bias
 * added for free.
 *
 * Plain C with AVX-512F intrinsics (no torch headers), compiled only when asked for
 * (``optimize_for_inference`` or ``kn-transformers build-kernels``, see kernels/__init__.py) and
 * called through ctypes; rows are split over OpenMP threads of the runtime torch loaded.
 */
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define KN_INLINE static inline __attribute__((always_inline))

int kn_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

/* t[n, k, 0:m2] repeated over the 16 lanes (m2 divides 16). */
KN_INLINE __m512 pattern(const float *p, const int m2) {
    if (m2 == 1) return _mm512_set1_ps(p[0]);
    if (m2 == 2) {
        double d;
        memcpy(&d, p, sizeof d);
        return _mm512_castpd_ps(_mm512_set1_pd(d));
    }
    if (m2 == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
    if (m2 == 8) return _mm512_broadcast_f32x8(_mm256_loadu_ps(p));
    return _mm512_loadu_ps(p);
}

/* R rows x C 16-lane chunks of the output; R, C, m2 are compile-time constants after inlining. */
KN_INLINE void tile(const float *t, const float *ad, const float *bias, float *y, const int K, const int lda,
                    const int M, const int m2, const int R, const int C) {
    __m512 acc[6][4];
    for (int c = 0; c < C; c++) {
        __m512 b = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) acc[r][c] = b;
    }
    const size_t ts = (size_t)K * m2;
    for (int k = 0; k < K; k++) {
        __m512 a[4];
        for (int c = 0; c < C; c++) a[c] = _mm512_loadu_ps(ad + (size_t)k * lda + 16 * c);
        for (int r = 0; r < R; r++) {
            __m512 v = pattern(t + r * ts + (size_t)k * m2, m2);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(a[c], v, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(y + (size_t)r * M + 16 * c, acc[r][c]);
}

#define ROWS 6       /* rows per register tile */
#define CHUNKS 4     /* 16-lane chunks per register tile: 6 x 4 accumulators */
#define CW (16 * CHUNKS)
#define ROW_TILE 48  /* rows per cache tile: A is swept once per tile, the tile's t stays in L1 */

/* The A-stage for rows [0, rows) of a tile: t (rows, K, m2) -> y (rows, M). ``adp`` holds
 * ``a_dup`` packed by column blocks: block c0 (width w = min(64, M - c0)) at adp + c0*K,
 * row-major (K, w), so each register tile streams its A values contiguously. */
KN_INLINE void a_stage(const float *t, const float *adp, const float *bias, float *y, long rows, const int K,
                       const int M, const int m2, const char *pf, const long pf_lines) {
    const size_t ts = (size_t)K * m2;
    /* ``pf_lines`` cache lines from ``pf`` (the next tile's input) are prefetched into L2 a few
     * at a time between register tiles, so that reading the input overlaps this tile's FMAs */
    const long calls = (long)((M + CW - 1) / CW) * ((rows + ROWS - 1) / ROWS + ROWS);
    const long per = calls > 0 ? (pf_lines + calls - 1) / calls : 0;
    long done = 0;
#define KN_PREFETCH()                                                          \
    for (long l_ = 0; l_ < per && done < pf_lines; l_++, done++) _mm_prefetch(pf + done * 64, _MM_HINT_T1)
    for (int c0 = 0; c0 < M; c0 += CW) {
        const int w = M - c0 < CW ? M - c0 : CW;
        const float *ab = adp + (size_t)c0 * K;
        long n = 0;
        if (w == CW) {
            for (; n + ROWS <= rows; n += ROWS) {
                KN_PREFETCH();
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, ROWS, CHUNKS);
            }
            for (; n < rows; n++)
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, 1, CHUNKS);
        } else {
            for (int c = 0; c < w; c += 16) {
                for (n = 0; n + ROWS <= rows; n += ROWS) {
                    KN_PREFETCH();
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, ROWS, 1);
                }
                for (; n < rows; n++)
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, 1, 1);
            }
        }
    }
#undef KN_PREFETCH
}

/* The B-stage of one row, t[(j1, rr), i2] = sum_j2 x[j1, j2] B[rr, i2, j2] for n1 and n2
 * multiples of 16 and q = r*m2 outputs per j1, 16 rows j1 at a time.
 *
 * Half a 16x16 transpose (two shuffle stages) puts, in u[4i+c], lane (L, rho) =
 * x[4i+rho, 4L+c]; one FMA per (q, u) with ``bpat`` (lane (L, rho) = B[p, 4L+c], built once per
 * call) gives partial sums over each 128-bit lane's 4 columns, and three cross-lane
 * shuffle-adds finish them: 46 shuffles per 16x16 block and q = 2 instead of 64 for a full
 * transpose. The q results are interleaved into t's layout. */
KN_INLINE void b_stage_row(const float *x, const float *bpat, float *t, const int n1, const int n2, const int q) {
    for (int jb = 0; jb < n1; jb += 16) {
        __m512 acc[16][4];
        for (int p = 0; p < q; p++)
            for (int i = 0; i < 4; i++) acc[p][i] = _mm512_setzero_ps();
        for (int cb = 0; cb < n2; cb += 16) {
            __m512 r[16], v[16], u[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(x + (size_t)(jb + i) * n2 + cb);
            for (int i = 0; i < 8; i++) {
                v[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                v[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 4; i++) {
                u[4 * i + 0] = _mm512_shuffle_ps(v[4 * i + 0], v[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 1] = _mm512_shuffle_ps(v[4 * i + 0], v[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                u[4 * i + 2] = _mm512_shuffle_ps(v[4 * i + 1], v[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 3] = _mm512_shuffle_ps(v[4 * i + 1], v[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            const float *bp = bpat + (size_t)(cb / 16) * q * 64;
            for (int p = 0; p < q; p++)
                for (int c = 0; c < 4; c++) {
                    const __m512 b = _mm512_loadu_ps(bp + (p * 4 + c) * 16);
                    for (int i = 0; i < 4; i++) acc[p][i] = _mm512_fmadd_ps(u[4 * i + c], b, acc[p][i]);
                }
        }
        __m512 res[16];
        for (int p = 0; p < q; p++) {
            /* lane i of the result = sum over the 4 lanes of acc[p][i]: rows jb+4i .. jb+4i+3 */
            const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0x88),
                                             _mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0xdd));
            const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0x88),
                                             _mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0xdd));
            res[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
        }
        float *out = t + (size_t)jb * q;
        if (q == 1) {
            _mm512_storeu_ps(out, res[0]);
        } else if (q == 2) {
            const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            _mm512_storeu_ps(out, _mm512_permutex2var_ps(res[0], lo, res[1]));
            _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(res[0], hi, res[1]));
        } else {
            float tmp[16][16];
            for (int p = 0; p < q; p++) _mm512_storeu_ps(tmp[p], res[p]);
            for (int i = 0; i < 16; i++)
                for (int p = 0; p < q; p++) out[i * q + p] = tmp[p][i];
        }
    }
}

/* The B-stage of one row for B 2x2 (rank 1; n1 a multiple of 8): 16 floats of x are the pairs
 * (x[a, 0], x[a, 1]) of 8 consecutive j1; with the pairs swapped in place, two FMAs by
 * [B00, B11, ...] and [B01, B10, ...] give t[a, i2] = B[i2, 0] x[a, 0] + B[i2, 1] x[a, 1] in t's own
 * layout. */
KN_INLINE void b_stage_row_2x2(const float *x, const float *B, float *t, const int n1) {
    const __m512 diag = _mm512_set_ps(B[3], B[0], B[3], B[0], B[3], B[0], B[3], B[0],
                                      B[3], B[0], B[3], B[0], B[3], B[0], B[3], B[0]);
    const __m512 anti = _mm512_set_ps(B[2], B[1], B[2], B[1], B[2], B[1], B[2], B[1],
                                      B[2], B[1], B[2], B[1], B[2], B[1], B[2], B[1]);
    for (int j = 0; j < 2 * n1; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        const __m512 sw = _mm512_permute_ps(v, 0xB1);
        _mm512_storeu_ps(t + j, _mm512_fmadd_ps(sw, anti, _mm512_mul_ps(v, diag)));
    }
}

/* bpat[(cb/16, p, c)] lane (L, rho) = B[p, cb + 4L + c]: the B values matching b_stage_row's u. */
static void b_patterns(const float *B, float *bpat, const int n2, const int q) {
    for (int cb = 0; cb < n2; cb += 16)
        for (int p = 0; p < q; p++)
            for (int c = 0; c < 4; c++)
                for (int L = 0; L < 4; L++)
                    for (int rho = 0; rho < 4; rho++)
                        bpat[(((size_t)(cb / 16) * q + p) * 4 + c) * 16 + L * 4 + rho] = B[(size_t)p * n2 + cb + 4 * L + c];
}

KN_INLINE int run(const float *x, const float *B, const float *t, const float *adp, const float *bias, float *y,
                  long N, const int n1, const int n2, const int r, const int m2, const int M, int threads) {
    const int K = n1 * r;
    const long tiles = (N + ROW_TILE - 1) / ROW_TILE;
    if (threads > tiles) threads = (int)tiles;
    if (threads < 1) threads = 1;
    int failed = 0;
    float *bpat = NULL;
    if (N == 0) return 0;
    if (x && n2 % 16 == 0) {
        bpat = (float *)malloc(sizeof(float) * (size_t)(n2 / 16) * r * m2 * 64);
        if (!bpat) return -1;
        b_patterns(B, bpat, n2, r * m2);
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* equal row ranges per thread (multiples of ROWS), then tiles within each: an even split
         * of N rows, where tiles dealt round the threads leave one up to a tile ahead */
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        long lo = N * tid / nth, hi = N * (tid + 1) / nth;
        lo -= lo % ROWS;
        if (tid + 1 < nth) hi -= hi % ROWS;
        float *buf = x ? (float *)malloc(sizeof(float) * ROW_TILE * (size_t)K * m2) : NULL;
        if (x && !buf) failed = 1;
        for (long n0 = lo; n0 < hi && !(x && !buf); n0 += ROW_TILE) {
            const long rows = hi - n0 < ROW_TILE ? hi - n0 : ROW_TILE;
            const float *tt = t + n0 * (size_t)K * m2;
            if (x) {
                const size_t xs = (size_t)n1 * n2, ts = (size_t)K * m2;
                /* constant q: the accumulators stay in registers */
                if (n2 == 2 && m2 == 2 && r == 1) {
                    for (long n = 0; n < rows; n++) b_stage_row_2x2(x + (n0 + n) * xs, B, buf + n * ts, n1);
                } else switch (r * m2) {
                    case 1: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 1); break;
                    case 2: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 2); break;
                    case 4: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 4); break;
                    case 8: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 8); break;
                    default: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 16); break;
                }
                tt = buf;
            }
            /* the next tile's input, to prefetch while this one computes */
            const long next = n0 + ROW_TILE < hi ? (hi - n0 - ROW_TILE < ROW_TILE ? hi - n0 - ROW_TILE : ROW_TILE) : 0;
            const char *pf = x ? (const char *)(x + (n0 + ROW_TILE) * (size_t)n1 * n2)
                               : (const char *)(t + (n0 + ROW_TILE) * (size_t)K * m2);
            const long pf_lines = next * (long)(x ? (size_t)n1 * n2 : (size_t)K * m2) * 4 / 64;
            a_stage(tt, adp, bias, y + n0 * (size_t)M, rows, K, M, m2, pf, pf_lines);
        }
        free(buf);
    }
    free(bpat);
    return failed ? -1 : 0;
}

/* v[k] = the sum of the 16 lanes of acc[k]: a transpose-and-add tree, 30 shuffles and 15 adds. */
KN_INLINE __m512 hsum16(const __m512 acc[16]) {
    __m512 s1[8], s2[4];
    for (int p = 0; p < 8; p++)  /* per 128-bit lane: halves of the sums of acc[2p] and acc[2p+1], interleaved */
        s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * p], acc[2 * p + 1]),
                              _mm512_unpackhi_ps(acc[2 * p], acc[2 * p + 1]));
    for (int q = 0; q < 4; q++)  /* element e of 128-bit lane L: the sum of lane L of acc[4q + e] */
        s2[q] = _mm512_add_ps(_mm512_shuffle_ps(s1[2 * q], s1[2 * q + 1], 0x44),
                              _mm512_shuffle_ps(s1[2 * q], s1[2 * q + 1], 0xEE));
    const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
    const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

/* t[ci * ts + ri] = dot(x row ci, b row ri) over n2 (a multiple of 16) for C rows of x and R = 16 / C
 * rows of b: 16 accumulators, R + C loads per 16 FMAs, both operands read along their rows. */
KN_INLINE void dots(const float *x, const float *b, float *t, const int n2, const int ts, const int C) {
    const int R = 16 / C;
    __m512 acc[16];
    for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_ps();
    for (int j = 0; j < n2; j += 16) {
        __m512 xv[4];
        for (int ci = 0; ci < C; ci++) xv[ci] = _mm512_loadu_ps(x + (size_t)ci * n2 + j);
        for (int ri = 0; ri < R; ri++) {
            const __m512 bv = _mm512_loadu_ps(b + (size_t)ri * n2 + j);
            for (int ci = 0; ci < C; ci++) acc[ci * R + ri] = _mm512_fmadd_ps(xv[ci], bv, acc[ci * R + ri]);
        }
    }
    float v[16];
    _mm512_storeu_ps(v, hsum16(acc));
    for (int ci = 0; ci < C; ci++) memcpy(t + (size_t)ci * ts, v + ci * R, sizeof(float) * R);
}

/* Both stages for a small A, a wide B and few rows (e.g. A 2x2 (x) B 384x384 at 8 tokens):
 * y (N, m1*m2) = x (N, n1, n2) @ (sum_r A_r (x) B_r)^T + bias, with acat (m1, n1*r), column (j1, r).
 *
 * Why: at a few rows a BLAS B-stage is dominated by its call and threading overhead and by
 * reading B through a transposed view, and the dense matmul it competes with is as fast as it
 * gets. Here each thread takes blocks of 16 rows of B, computes their dot products with every
 * row of x (B and x both read along their rows, no copy or packing), and turns them straight
 * into 16 output columns of every token with the A-stage and the bias. Needs n2 and m2
 * multiples of 16; rank at most 16. Returns 0, or -1 for unsupported shapes or
 * out of memory. */
int kn_small_a_rows(const float *x, const float *B, const float *acat, const float *bias, float *y, long N, int n1,
                    int n2, int r, int m1, int m2, int threads) {
    if (N < 0 || n1 < 1 || n2 < 16 || n2 % 16 || m2 < 16 || m2 % 16 || r < 1 || r > 16 || m1 < 1) return -1;
    if (N == 0) return 0;
    const long cols = N * n1;  /* rows (n, j1) of x */
    const int K = n1 * r, M = m1 * m2, blocks = m2 / 16, ts = 16 * r;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = blocks;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* t16[(n, j1), rr, 0:16] = B-stage output for the current 16 columns i2 */
        float *t16 = (float *)aligned_alloc(64, sizeof(float) * (size_t)cols * ts);
        if (!t16) failed = 1;
#pragma omp for schedule(static)
        for (int ib = 0; ib < blocks; ib++) {
            if (!t16) continue;
            for (int rr = 0; rr < r; rr++) {
                const float *b = B + ((size_t)rr * m2 + (size_t)ib * 16) * n2;
                float *t = t16 + rr * 16;
                long c = 0;
                for (; c + 4 <= cols; c += 4)
                    for (int i0 = 0; i0 < 16; i0 += 4) dots(x + c * n2, b + (size_t)i0 * n2, t + c * ts + i0, n2, ts, 4);
                for (; c + 2 <= cols; c += 2)
                    for (int i0 = 0; i0 < 16; i0 += 8) dots(x + c * n2, b + (size_t)i0 * n2, t + c * ts + i0, n2, ts, 2);
                for (; c < cols; c++) dots(x + c * n2, b, t + c * ts, n2, ts, 1);
            }
            for (long n = 0; n < N; n++) {
                const float *tn = t16 + (size_t)n * n1 * ts;
                float *yn = y + (size_t)n * M + (size_t)ib * 16;
                for (int i1 = 0; i1 < m1; i1++) {
                    __m512 s = bias ? _mm512_loadu_ps(bias + (size_t)i1 * m2 + (size_t)ib * 16) : _mm512_setzero_ps();
                    const float *a = acat + (size_t)i1 * K;
                    for (int k = 0; k < K; k++) s = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_load_ps(tn + (size_t)k * 16), s);
                    _mm512_storeu_ps(yn + (size_t)i1 * m2, s);
                }
            }
        }
        free(t16);
    }
    return failed ? -1 : 0;
}

/* The A-stage for a small A and a wide B (e.g. A 8x2 (x) B 384x384, KroneckerBERT8's FFN):
 * y[n, i1*m2 + c] = bias[i1*m2 + c] + sum_k acat[i1, k] t[n, k, c] with t (N, K, m2) the B-stage
 * output and acat (m1, K). One streaming pass writes y with the bias in it, instead of a batched
 * matmul of N tiny products and then a bias pass over the (large) output. Any m2 >= 1. Returns 0, or -1 for bad arguments. */
int kn_small_a_stage(const float *t, const float *acat, const float *bias, float *y, long N, int K, int m1, int m2,
                     int threads) {
    if (N < 0 || K < 1 || m1 < 1 || m2 < 1) return -1;
    if (threads < 1) threads = 1;
    if (N < threads) threads = N > 0 ? (int)N : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const float *tn = t + n * (size_t)K * m2;
        float *yn = y + n * (size_t)m1 * m2;
        for (int i1 = 0; i1 < m1; i1++) {
            const float *a = acat + (size_t)i1 * K;
            const float *b = bias ? bias + (size_t)i1 * m2 : NULL;
            float *out = yn + (size_t)i1 * m2;
            for (int c = 0; c < m2; c += 16) {
                const __mmask16 mask = m2 - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m2 - c)) - 1u);
                __m512 acc = b ? _mm512_maskz_loadu_ps(mask, b + c) : _mm512_setzero_ps();
                for (int k = 0; k < K; k++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_maskz_loadu_ps(mask, tn + (size_t)k * m2 + c), acc);
                _mm512_mask_storeu_ps(out + c, mask, acc);
            }
        }
    }
    return 0;
}

/* Whether kn_kron_forward can compute the B-stage itself for these shapes. */
int kn_fuses_b_stage(int n1, int n2, int r, int m2) {
    const int q = r * m2;
    if (n2 == 2 && m2 == 2 && r == 1) return n1 % 8 == 0;
    return n1 % 16 == 0 && n2 % 16 == 0 && (q == 1 || q == 2 || q == 4 || q == 8 || q == 16);
}

/* y (N, M) = x (N, n1*n2) @ (sum_r A_r (x) B_r)^T + bias with A packed as ``adp`` (see a_stage).
 * With x given (shapes where kn_fuses_b_stage: n1, n2 multiples of 16 and r*m2 in {1, 2, 4, 8, 16}, or
 * B 2x2 of rank 1 with n1 a multiple of 8), the B-stage runs here from x and B
 * (r, m2, n2), tile by tile; with x NULL, t (N, n1*r, m2) is the B-stage output computed by the
 * caller. Needs M % 16 == 0 and m2 in {1, 2, 4, 8, 16}; returns 0 on success,
 * -1 otherwise. */
int kn_kron_forward(const float *x, const float *B, const float *t, const float *adp, const float *bias, float *y,
                    long N, int n1, int n2, int r, int m2, int M, int threads) {
    if (M % 16 || N < 0) return -1;
    if (x && !kn_fuses_b_stage(n1, n2, r, m2)) return -1;
    if (!x && !t) return -1;
    switch (m2) {
        case 1: return run(x, B, t, adp, bias, y, N, n1, n2, r, 1, M, threads);
        case 2: return run(x, B, t, adp, bias, y, N, n1, n2, r, 2, M, threads);
        case 4: return run(x, B, t, adp, bias, y, N, n1, n2, r, 4, M, threads);
        case 8: return run(x, B, t, adp, bias, y, N, n1, n2, r, 8, M, threads);
        case 16: return run(x, B, t, adp, bias, y, N, n1, n2, r, 16, M, threads);
        default: return -1;
    }
}
