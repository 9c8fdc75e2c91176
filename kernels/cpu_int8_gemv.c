/* 8-bit weight x float activations for a few rows on the CPU (issue 20; built by kernels/cpu_native.py).
 *
 * GGUF Q8_0 (the default model's tied embedding / LM head): W = q * d per group of 32 columns, q int8,
 * d fp16. Storage (int4_cpu.int8_gemv_blocks): per output row G = K/32 fp16 d, then G x 32 int8 codes:
 * Q8_0's 34 bytes a group, one run per row, where the int4 path would read it as two 4-bit planes (40
 * bytes a group and twice the decoding). out[m, n] = sum_g (q d) . x_g, in float32 throughout (q d is
 * exact). Several input rows: a group is converted once for R output rows and applied to up to CHUNK
 * input rows, each output the same chain of operations for any number of rows (cpu_int4_gemv.c).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define CHUNK 6 /* input rows per pass over a block of weights (register-blocked) */
#define MAX_R 4 /* output rows converted together */
#define ROW_BLOCK 64

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 codes(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

/* Output rows n..n+R against input rows 0..M: each group's codes are converted and scaled once (q * d is
 * exact in float32: an int8 code times an fp16 d) and applied to all M rows, two FMAs a row. Every
 * (output, input) pair is the same chain of operations whatever R and M are (per group lo += w_lo x_lo,
 * hi += w_hi x_hi, then one reduction of lo + hi): a row's result does not depend on the other rows. */
static inline __attribute__((always_inline)) void q8_block(const uint8_t *w, const float *x, int64_t x_stride,
                                                           int64_t n, const int R, const int M, int64_t groups,
                                                           float *out, int64_t n_out, int prefetch) {
    const int64_t row_bytes = groups * (2 + GROUP);
    const uint16_t *dn[MAX_R];
    const int8_t *qn[MAX_R];
    __m512 lo[MAX_R][CHUNK], hi[MAX_R][CHUNK]; /* fixed sizes: the constant R and M keep them in registers */
    if (prefetch)
        for (int64_t o = 0; o < R * row_bytes; o += 64) _mm_prefetch((const char *)w + (n + R) * row_bytes + o, _MM_HINT_T0);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
        dn[r] = (const uint16_t *)(w + (n + r) * row_bytes);
        qn[r] = (const int8_t *)(w + (n + r) * row_bytes + 2 * groups);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) lo[r][m] = hi[r][m] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < groups; ++g) {
        __m512 wl[MAX_R], wh[MAX_R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(dn[r][g]));
            wl[r] = _mm512_mul_ps(codes(qn[r] + g * GROUP), d);
            wh[r] = _mm512_mul_ps(codes(qn[r] + g * GROUP + 16), d);
        }
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
            const float *xg = x + m * x_stride + g * GROUP;
            const __m512 xl = _mm512_loadu_ps(xg), xh = _mm512_loadu_ps(xg + 16);
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) {
                lo[r][m] = _mm512_fmadd_ps(wl[r], xl, lo[r][m]);
                hi[r][m] = _mm512_fmadd_ps(wh[r], xh, hi[r][m]);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) out[m * n_out + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][m], hi[r][m]));
}

static inline __attribute__((always_inline)) void rows_q8(const uint8_t *w, const float *x, int64_t x_stride,
                                                          int64_t n0, int64_t n1, int64_t groups, const int R,
                                                          const int M, float *out, int64_t n_out) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) q8_block(w, x, x_stride, n, R, M, groups, out, n_out, n + 2 * R <= n1);
    for (; n < n1; ++n) q8_block(w, x, x_stride, n, 1, M, groups, out, n_out, 0);
}

#define Q8_CASE(M, R) \
    case M: rows_q8(w, x + m0 * x_stride, x_stride, n0, n1, groups, R, M, out + m0 * n, n); break;

int radixlm_int8_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      float *out, int num_threads) {
    if (m_rows < 1 || k % GROUP) return -1;
    const int64_t groups = k / GROUP, blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < n ? n0 + ROW_BLOCK : n;
        for (int64_t m0 = 0; m0 < m_rows; m0 += CHUNK) /* the block's weights stay in cache between chunks */
            switch (m_rows - m0 < CHUNK ? m_rows - m0 : CHUNK) {
                Q8_CASE(1, 4) Q8_CASE(2, 4) Q8_CASE(3, 3) Q8_CASE(4, 2) Q8_CASE(5, 2) Q8_CASE(6, 2)
            }
    }
    return 0;
}

#else /* no AVX-512: plain float32 */

int radixlm_int8_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      float *out, int num_threads) {
    if (m_rows < 1 || k % GROUP) return -1;
    const int64_t groups = k / GROUP;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n > ROW_BLOCK)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *wn = w + r * groups * (2 + GROUP);
        const int8_t *qn = (const int8_t *)(wn + 2 * groups);
        for (int64_t m = 0; m < m_rows; ++m) {
            float total = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                _Float16 d;
                memcpy(&d, wn + 2 * g, 2);
                float dot = 0.0f;
                for (int j = 0; j < GROUP; ++j) dot += (float)qn[g * GROUP + j] * x[m * x_stride + g * GROUP + j];
                total += (float)d * dot;
            }
            out[m * n + r] = total;
        }
    }
    return 0;
}
#endif
