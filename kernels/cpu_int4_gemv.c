/* 4-bit weight x float activations for a few rows on the CPU (issue 20; built by kernels/cpu_native.py).
 *
 * out[m, n] = sum_k x[m, k] W[n, k], W = sum over P planes of c * d + m0 per group of 32 columns
 * (gguf_blocks.AffinePlanes with d = s, m0 = z - 8 s). Storage (int4_cpu.gemv_blocks): per output row
 * of G = P*K/32 groups, G fp16 d, G fp16 m0, then G x 16 bytes of codes where byte j of a group =
 * code 2j | code 2j+1 << 4: Q4_1's 20 bytes a group, one sequential run per row (a batch-1 step is
 * bound by the bytes it reads).
 *
 * AVX-512 path: 16 bytes of codes -> the 16 even and the 16 odd columns' codes as floats (one table
 * lookup each), multiplied with x in float32 (its columns reordered once per call to match), so
 * D_g = sum c x per group; out = sum_g d_g D_g + m0_g sx_g with sx_g the group's sum of x. Float32
 * throughout: no rounding of activations or scales. One weight read feeds M rows. Other CPUs: the
 * same sums in plain C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define BLOCK 20 /* bytes per group: fp16 d, fp16 m0, 16 bytes of codes */
#define MAX_ROWS 8
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

/* The codes of 16 bytes (32 columns) as floats: even columns (low nibbles) and odd ones (high nibbles);
 * vpermps reads only the low 4 bits of each index, so the table lookup is the conversion. */
static inline void codes_f32(const uint8_t *q, __m512 *even, __m512 *odd) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *even = _mm512_permutexvar_ps(b, table);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

/* sum_g m0_g sx_g of rows n..n+R, i.e. the zeros' share, from the row's G fp16 d and m0 */
static inline __m512 zero_terms(const uint16_t *mn, const float *sxe, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 keep = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, mn + g)), _mm512_maskz_loadu_ps(keep, sxe + g), acc);
    }
    return acc;
}

static inline __attribute__((always_inline)) void gemv_rows(
    const uint8_t *w, const float *xs, const float *sxe, int64_t n0, int64_t n1, int64_t groups, int64_t gk,
    const int m_rows, int64_t kx, float *out, int64_t n_out) {
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t *wn = w + n * groups * BLOCK, *codes = wn + 4 * groups;
        const uint16_t *dn = (const uint16_t *)wn, *mn = dn + groups;
        __m512 acc[MAX_ROWS];
        for (int m = 0; m < m_rows; ++m) acc[m] = zero_terms(mn, sxe + m * groups, groups);
        for (int64_t p = 0; p < groups; p += gk) /* plane by plane: group gx of a plane reads x[gx * 32:] */
            for (int64_t gx = 0; gx < gk; ++gx) {
                const int64_t g = p + gx;
                __m512 even, odd;
                codes_f32(codes + g * (GROUP / 2), &even, &odd);
                const __m512 scale = _mm512_set1_ps(_cvtsh_ss(dn[g]));
                for (int m = 0; m < m_rows; ++m) {
                    const float *xg = xs + m * kx + gx * GROUP; /* 16 even columns, then 16 odd ones */
                    const __m512 dot = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(even, _mm512_loadu_ps(xg)));
                    acc[m] = _mm512_fmadd_ps(dot, scale, acc[m]);
                }
            }
        for (int m = 0; m < m_rows; ++m) out[m * n_out + n] = _mm512_reduce_add_ps(acc[m]);
    }
}

/* One input row, R output rows at a time: R independent accumulator chains, x read once for all R. */
#define R 4
static void gemv_one(const uint8_t *w, const float *xs, const float *sxe, int64_t n0, int64_t n1, int64_t groups,
                     int64_t gk, float *out) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) {
        const uint8_t *codes[R];
        const uint16_t *dn[R];
        __m512 acc[R];
        if (n + 2 * R <= n1) { /* the next R rows: one contiguous run */
            const uint8_t *next = w + (n + R) * groups * BLOCK;
            for (int64_t o = 0; o < R * groups * BLOCK; o += 64) _mm_prefetch((const char *)next + o, _MM_HINT_T0);
        }
        for (int r = 0; r < R; ++r) {
            const uint8_t *wn = w + (n + r) * groups * BLOCK;
            dn[r] = (const uint16_t *)wn;
            codes[r] = wn + 4 * groups;
            acc[r] = zero_terms(dn[r] + groups, sxe, groups);
        }
        for (int64_t p = 0; p < groups; p += gk)
            for (int64_t gx = 0; gx < gk; ++gx) {
                const int64_t g = p + gx;
                const __m512 xe = _mm512_loadu_ps(xs + gx * GROUP), xo = _mm512_loadu_ps(xs + gx * GROUP + 16);
                for (int r = 0; r < R; ++r) {
                    __m512 even, odd;
                    codes_f32(codes[r] + g * (GROUP / 2), &even, &odd);
                    const __m512 dot = _mm512_fmadd_ps(odd, xo, _mm512_mul_ps(even, xe));
                    acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(_cvtsh_ss(dn[r][g])), acc[r]);
                }
            }
        for (int r = 0; r < R; ++r) out[n + r] = _mm512_reduce_add_ps(acc[r]);
    }
    if (n < n1) gemv_rows(w, xs, sxe, n, n1, groups, gk, 1, 0, out, 0);
}
#undef R

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

#define ROWS_CASE(M) \
    case M: gemv_rows(w, xs, sxe, n0, n1, groups, gk, M, k, out, n); break;

int radixlm_int4_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      int64_t planes, float *out, int num_threads) {
    if (m_rows < 1 || m_rows > MAX_ROWS || k % GROUP) return -1;
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
        switch (m_rows) {
        case 1: gemv_one(w, xs, sxe, n0, n1, groups, gk, out); break;
            ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
        }
    }
    free(xs);
    free(sxe);
    return 0;
}

#else /* no AVX-512: plain float32 */

int radixlm_int4_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      int64_t planes, float *out, int num_threads) {
    if (m_rows < 1 || m_rows > MAX_ROWS || k % GROUP) return -1;
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
