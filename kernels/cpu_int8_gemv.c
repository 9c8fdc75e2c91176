/* 8-bit weight x float activations for a few rows on the CPU (issue 20; built by kernels/cpu_native.py).
 *
 * GGUF Q8_0 (the default model's tied embedding / LM head): W = q * d per group of 32 columns, q int8,
 * d fp16. Storage (int4_cpu.int8_gemv_blocks): per output row G = K/32 fp16 d, then G x 32 int8 codes:
 * Q8_0's 34 bytes a group, one run per row, where the int4 path would read it as two 4-bit planes (40
 * bytes a group and twice the decoding). out[m, n] = sum_g d_g sum_j q x, in float32 throughout.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define MAX_ROWS 8
#define ROW_BLOCK 64

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 codes(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

static inline __attribute__((always_inline)) void rows_q8(const uint8_t *w, const float *x, int64_t x_stride,
                                                          int64_t n0, int64_t n1, int64_t groups, const int m_rows,
                                                          float *out, int64_t n_out) {
    const int64_t row_bytes = groups * (2 + GROUP);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wn = w + n * row_bytes;
        const uint16_t *dn = (const uint16_t *)wn;
        const int8_t *qn = (const int8_t *)(wn + 2 * groups);
        for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch((const char *)wn + row_bytes + o, _MM_HINT_T0);
        __m512 acc[2][MAX_ROWS];
        for (int m = 0; m < m_rows; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 2 <= groups; g += 2) { /* two groups a turn: two accumulator chains */
            const __m512 a0 = codes(qn + g * GROUP), b0 = codes(qn + g * GROUP + 16);
            const __m512 a1 = codes(qn + g * GROUP + 32), b1 = codes(qn + g * GROUP + 48);
            const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(dn[g])), d1 = _mm512_set1_ps(_cvtsh_ss(dn[g + 1]));
            for (int m = 0; m < m_rows; ++m) {
                const float *xg = x + m * x_stride + g * GROUP;
                const __m512 t0 = _mm512_fmadd_ps(b0, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(a0, _mm512_loadu_ps(xg)));
                const __m512 t1 = _mm512_fmadd_ps(b1, _mm512_loadu_ps(xg + 48), _mm512_mul_ps(a1, _mm512_loadu_ps(xg + 32)));
                acc[0][m] = _mm512_fmadd_ps(t0, d0, acc[0][m]);
                acc[1][m] = _mm512_fmadd_ps(t1, d1, acc[1][m]);
            }
        }
        if (g < groups) {
            const __m512 a0 = codes(qn + g * GROUP), b0 = codes(qn + g * GROUP + 16);
            const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(dn[g]));
            for (int m = 0; m < m_rows; ++m) {
                const float *xg = x + m * x_stride + g * GROUP;
                const __m512 t0 = _mm512_fmadd_ps(b0, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(a0, _mm512_loadu_ps(xg)));
                acc[0][m] = _mm512_fmadd_ps(t0, d0, acc[0][m]);
            }
        }
        for (int m = 0; m < m_rows; ++m) out[m * n_out + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
    }
}

#define Q8_CASE(M) \
    case M: rows_q8(w, x, x_stride, n0, n1, groups, M, out, n); break;

int radixlm_int8_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      float *out, int num_threads) {
    if (m_rows < 1 || m_rows > MAX_ROWS || k % GROUP) return -1;
    const int64_t groups = k / GROUP, blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < n ? n0 + ROW_BLOCK : n;
        switch (m_rows) { Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8) }
    }
    return 0;
}

#else /* no AVX-512: plain float32 */

int radixlm_int8_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      float *out, int num_threads) {
    if (m_rows < 1 || m_rows > MAX_ROWS || k % GROUP) return -1;
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
