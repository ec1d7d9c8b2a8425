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
 * Plain C with AVX-512F intrinsics (no torch headers), built on first use by
 * kn_transformers/native.py and called through ctypes on row ranges (ctypes releases the GIL,
 * so Python threads split the rows).
 */
#include <immintrin.h>
#include <stddef.h>
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
#define ROW_TILE 24  /* rows per cache tile: A is swept once per tile, the tile's t stays in L1 */

/* The A-stage for rows [0, rows) of a tile: t (rows, K, m2) -> y (rows, M). ``adp`` holds
 * ``a_dup`` packed by column blocks: block c0 (width w = min(64, M - c0)) at adp + c0*K,
 * row-major (K, w), so each register tile streams its A values contiguously. */
KN_INLINE void a_stage(const float *t, const float *adp, const float *bias, float *y, long rows, const int K,
                       const int M, const int m2) {
    const size_t ts = (size_t)K * m2;
    for (int c0 = 0; c0 < M; c0 += CW) {
        const int w = M - c0 < CW ? M - c0 : CW;
        const float *ab = adp + (size_t)c0 * K;
        long n = 0;
        if (w == CW) {
            for (; n + ROWS <= rows; n += ROWS)
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, ROWS, CHUNKS);
            for (; n < rows; n++)
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, 1, CHUNKS);
        } else {
            for (int c = 0; c < w; c += 16) {
                for (n = 0; n + ROWS <= rows; n += ROWS)
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, ROWS, 1);
                for (; n < rows; n++)
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, 1, 1);
            }
        }
    }
}

KN_INLINE void run(const float *t, const float *adp, const float *bias, float *y, long N, const int K,
                    const int m2, const int M, int threads) {
    const long tiles = (N + ROW_TILE - 1) / ROW_TILE;
    if (threads > tiles) threads = (int)tiles;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long tl = 0; tl < tiles; tl++) {
        const long n0 = tl * ROW_TILE;
        const long rows = N - n0 < ROW_TILE ? N - n0 : ROW_TILE;
        a_stage(t + n0 * (size_t)K * m2, adp, bias, y + n0 * (size_t)M, rows, K, M, m2);
    }
}

/* y (N, M) from the B-stage output t (N, K, m2) and A packed as ``adp`` (see a_stage), with the
 * output's (i1, i2) interleave and the bias fused. Needs M % 16 == 0 and m2 in {1, 2, 4, 8, 16};
 * returns 0 on success, -1 otherwise. */
int kn_kron_a_stage(const float *t, const float *adp, const float *bias, float *y, long N, int K, int m2, int M,
                    int threads) {
    if (M % 16 || N < 0) return -1;
    switch (m2) {
        case 1: run(t, adp, bias, y, N, K, 1, M, threads); return 0;
        case 2: run(t, adp, bias, y, N, K, 2, M, threads); return 0;
        case 4: run(t, adp, bias, y, N, K, 4, M, threads); return 0;
        case 8: run(t, adp, bias, y, N, K, 8, M, threads); return 0;
        case 16: run(t, adp, bias, y, N, K, 16, M, threads); return 0;
        default: return -1;
    }
}
