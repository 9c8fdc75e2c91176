/* 4-bit weight x float activations for a few rows on the CPU (issue 20; built by kernels/cpu_native.py).
 *
 * out[m, n] = sum_k x[m, k] W[n, k], W = sum over P planes of c * d + m0 per group of 32 columns
 * (gguf_blocks.AffinePlanes with d = s, m0 = z - 8 s). Storage (int4_cpu.gemv_blocks): per output row
 * of G = P*K/32 groups, G fp16 d, G fp16 m0, then G x 16 bytes of codes where byte j of a group =
 * code 2j | code 2j+1 << 4: Q4_1's 20 bytes a group, one sequential run per row (a batch-1 step is
 * bound by the bytes it reads).
 *
 * AVX-512 path: 16 bytes of codes -> the 16 even and the 16 odd columns' codes times d as floats (one
 * lookup each in the table {0..15} x d; exact: a 4-bit code times an fp16 value fits float32), then FMAs
 * with x in float32 (its columns reordered once per call to match); out = sum_g (c d) . x_g + m0_g sx_g
 * with sx_g the group's sum of x. Float32 throughout: no rounding of activations or scales.
 *
 * Several input rows (a verify step's k + 1 tokens, a small decode batch): a group is decoded and
 * scaled once for R output rows and applied to up to CHUNK input rows (two FMAs a row per group), so
 * an extra row costs its FMAs, not another decode (issue 18); more rows go in chunks over the same
 * block of weights (in cache by then). Each output is the same chain of operations for any number of
 * rows and any blocking: a row's result is bit for bit the same alone or among others. Other CPUs:
 * the same sums in plain C (also row by row).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define BLOCK 20 /* bytes per group: fp16 d, fp16 m0, 16 bytes of codes */
#define CHUNK 6 /* input rows per pass over a block of weights: R x CHUNK x 2 accumulators in registers */
#define MAX_R 4 /* output rows decoded together */
#define ROW_BLOCK 64 /* output rows per OpenMP work item */

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else { /* subnormal */
        float f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* The codes of 16 bytes (32 columns) times d: even columns (low nibbles) and odd ones (high nibbles);
 * vpermps reads only the low 4 bits of each index, so a lookup in the table {0..15} x d is the
 * conversion and the scaling at once (c * d is exact in float32: a 4-bit code times an fp16 value). */
static inline void scaled_codes(const uint8_t *q, float d, __m512 *even, __m512 *odd) {
    const __m512 table = _mm512_mul_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_ps(d));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *even = _mm512_permutexvar_ps(b, table);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

/* sum_g m0_g sx_g of one output row and one input row, i.e. the zeros' share, from the row's G fp16 m0 */
static inline __m512 zero_terms(const uint16_t *mn, const float *sxe, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 keep = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, mn + g)), _mm512_maskz_loadu_ps(keep, sxe + g), acc);
    }
    return acc;
}

/* Output rows n..n+R against input rows 0..M: each group's codes are decoded and scaled once (c * d is
 * exact in float32: a 4-bit code times an fp16 d) and applied to all M rows, two FMAs a row. Every
 * (output, input) pair is the same chain of operations whatever R and M are (zero terms, then per group
 * even += we * x_even, odd += wo * x_odd, then one reduction of even + odd): a row's result does not
 * depend on the other rows of the call. */
static inline __attribute__((always_inline)) void gemv_block(
    const uint8_t *w, const float *xs, const float *sxe, int64_t n, const int R, const int M, int64_t groups,
    int64_t gk, int64_t k, float *out, int64_t n_out, int prefetch) {
    const uint8_t *codes[MAX_R];
    const uint16_t *dn[MAX_R];
    __m512 even[MAX_R][CHUNK], odd[MAX_R][CHUNK]; /* fixed sizes: the constant R and M keep them in registers */
    if (prefetch) { /* the next R rows: one contiguous run */
        const uint8_t *next = w + (n + R) * groups * BLOCK;
        for (int64_t o = 0; o < R * groups * BLOCK; o += 64) _mm_prefetch((const char *)next + o, _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
        const uint8_t *wn = w + (n + r) * groups * BLOCK;
        dn[r] = (const uint16_t *)wn;
        codes[r] = wn + 4 * groups;
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) {
            even[r][m] = zero_terms(dn[r] + groups, sxe + m * groups, groups);
            odd[r][m] = _mm512_setzero_ps();
        }
    }
    for (int64_t p = 0; p < groups; p += gk) /* plane by plane: group gx of a plane reads x[gx * 32:] */
        for (int64_t gx = 0; gx < gk; ++gx) {
            const int64_t g = p + gx;
            __m512 we[MAX_R], wo[MAX_R];
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r) scaled_codes(codes[r] + g * (GROUP / 2), _cvtsh_ss(dn[r][g]), &we[r], &wo[r]);
#pragma GCC unroll 16
            for (int m = 0; m < M; ++m) {
                const float *xg = xs + m * k + gx * GROUP; /* 16 even columns, then 16 odd ones */
                const __m512 xe = _mm512_loadu_ps(xg), xo = _mm512_loadu_ps(xg + 16);
#pragma GCC unroll 16
                for (int r = 0; r < R; ++r) {
                    even[r][m] = _mm512_fmadd_ps(we[r], xe, even[r][m]);
                    odd[r][m] = _mm512_fmadd_ps(wo[r], xo, odd[r][m]);
                }
            }
        }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) out[m * n_out + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(even[r][m], odd[r][m]));
}

/* Output rows n0..n1 for M input rows, R output rows at a time (R x M x 2 accumulators in registers). */
static inline __attribute__((always_inline)) void gemv_rows(
    const uint8_t *w, const float *xs, const float *sxe, int64_t n0, int64_t n1, const int R, const int M,
    int64_t groups, int64_t gk, int64_t k, float *out, int64_t n_out) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) gemv_block(w, xs, sxe, n, R, M, groups, gk, k, out, n_out, n + 2 * R <= n1);
    for (; n < n1; ++n) gemv_block(w, xs, sxe, n, 1, M, groups, gk, k, out, n_out, 0);
}

/* x [K] -> per group of 32 its 16 even columns then its 16 odd ones (the codes' order), and the group sums */
static void split_columns(const float *x, int64_t k, float *xs, float *sx) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int64_t g = 0; g < k / GROUP; ++g) {
        const __m512 a = _mm512_loadu_ps(x + g * GROUP), b = _mm512_loadu_ps(x + g * GROUP + 16);
        const __m512 e = _mm512_permutex2var_ps(a, even, b), o = _mm512_permutex2var_ps(a, odd, b);
        _mm512_storeu_ps(xs + g * GROUP, e);
        _mm512_storeu_ps(xs + g * GROUP + 16, o);
        sx[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
}

#define ROWS_CASE(M, R) \
    case M: gemv_rows(w, xs + m0 * k, sxe + m0 * groups, n0, n1, R, M, groups, gk, k, out + m0 * n, n); break;

int radixlm_int4_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      int64_t planes, float *out, int num_threads) {
    if (m_rows < 1 || k % GROUP) return -1;
    const int64_t gk = k / GROUP, groups = planes * gk;
    float *xs = malloc(sizeof(float) * m_rows * k);
    float *sxe = malloc(sizeof(float) * m_rows * groups); /* group sums, repeated for each plane */
    if (xs == NULL || sxe == NULL) {
        free(xs);
        free(sxe);
        return -2;
    }
    for (int64_t m = 0; m < m_rows; ++m) {
        split_columns(x + m * x_stride, k, xs + m * k, sxe + m * groups);
        for (int64_t p = 1; p < planes; ++p) memcpy(sxe + m * groups + p * gk, sxe + m * groups, sizeof(float) * gk);
    }
    const int64_t blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * ROW_BLOCK, n1 = n0 + ROW_BLOCK < n ? n0 + ROW_BLOCK : n;
        for (int64_t m0 = 0; m0 < m_rows; m0 += CHUNK) /* the block's weights stay in cache between chunks */
            switch (m_rows - m0 < CHUNK ? m_rows - m0 : CHUNK) {
                ROWS_CASE(1, 4) ROWS_CASE(2, 4) ROWS_CASE(3, 3) ROWS_CASE(4, 2) ROWS_CASE(5, 2) ROWS_CASE(6, 2)
            }
    }
    free(xs);
    free(sxe);
    return 0;
}

#else /* no AVX-512: plain float32 */

int radixlm_int4_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      int64_t planes, float *out, int num_threads) {
    if (m_rows < 1 || k % GROUP) return -1;
    const int64_t gk = k / GROUP, groups = planes * gk;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && n > ROW_BLOCK)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *wn = w + r * groups * BLOCK;
        const uint16_t *dn = (const uint16_t *)wn, *mn = dn + groups;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float *xm = x + m * x_stride;
            float total = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                const float *xg = xm + (g % gk) * GROUP;
                const uint8_t *qg = wn + 4 * groups + g * (GROUP / 2);
                const float scale = half_to_float(dn[g]), zero = half_to_float(mn[g]);
                float d = 0.0f, sum = 0.0f;
                for (int j = 0; j < GROUP / 2; ++j) {
                    d += xg[2 * j] * (float)(qg[j] & 15) + xg[2 * j + 1] * (float)(qg[j] >> 4);
                    sum += xg[2 * j] + xg[2 * j + 1];
                }
                total += scale * d + zero * sum;
            }
            out[m * n + r] = total;
        }
    }
    return 0;
}
#endif
