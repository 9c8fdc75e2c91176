/* The CPU decode step's kernels in C, float32 (issue 20; built and loaded by kernels/cpu_native.py).
 *
 * Paged decode attention: one query token per request attends to its KV slots read in place from
 * the token-level pool (req_to_token[row, 0:len] -> slot -> k_pool[slot, :, :]), so no [B, L, H, D]
 * copy of every row's K/V is gathered per layer. Work item = one request: each K row (all KV heads,
 * one contiguous run, prefetched a few rows ahead) is scored against every query head, then a
 * softmax per head, then the V rows are summed into registers per head. Requests are spread over
 * OpenMP threads (torch's own libgomp: torch is loaded first and the soname matches). Same math as
 * kernels/attention_ref.decode_attention_ref in float32 (max-subtracted softmax); only the
 * summation order differs. Head dims 64 and 128 get their own unrolled copy; any multiple of 16 works.
 *
 * Then the layer's small ops (RMSNorm, residual add + RMSNorm, rotary, SiLU-and-mul): one call
 * each where torch dispatches several.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64), aligned(4)));
#define W 16
#define AHEAD 6

static inline float hsum(vf x) {
#if defined(__clang__) || __GNUC__ >= 12
    typedef float v8 __attribute__((vector_size(32), aligned(4)));
    v8 s = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
#else /* older GCC: a tree of adds in plain C */
    float a[W];
    memcpy(a, &x, sizeof a);
    for (int i = 0; i < W / 2; ++i) a[i] += a[i + W / 2];
    for (int i = 0; i < W / 4; ++i) a[i] += a[i + W / 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
#endif
}

/* exp of 16 floats at once (the softmax of decode attention and SiLU: a verify step runs one of each per
 * row per layer, ~100k scalar expf calls a row at a 200-token context, a tenth of the row's cost).
 * Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-6 polynomial, times 2^n; within
 * 2 ulp of expf over [-87.3, 88.7] (inputs clamped there: 0 and inf come out as ~1e-38 and ~1.6e38).
 * Lanes are independent, so a value's exp does not depend on its neighbours or the call's length. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365447505531f)), _mm512_set1_ps(88.3762626647949f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n); /* p * 2^n, exact */
}

/* y[i] = exp(x[i] + shift) for i < len */
static void exp_rows(const float *x, float shift, float *y, int64_t len) {
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 keep = len - i >= 16 ? 0xFFFF : (__mmask16)((1u << (len - i)) - 1);
        const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(keep, x + i), _mm512_set1_ps(shift));
        _mm512_mask_storeu_ps(y + i, keep, exp16(v));
    }
}
#else
static void exp_rows(const float *x, float shift, float *y, int64_t len) {
    for (int64_t i = 0; i < len; ++i) y[i] = expf(x[i] + shift);
}
#endif

static inline void prefetch_row(const float *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)row + o, 0, 3);
}

static inline __attribute__((always_inline)) void attend_request(
    const float *q, const float *k_pool, const float *v_pool, const int32_t *slots, int64_t len, int64_t hq,
    int64_t hkv, const int64_t dim, int64_t row, float scale, float *scores, float *out) {
    const int64_t group = hq / hkv, nc = dim / W; /* row: floats from one slot's K (V) to the next's */
    for (int64_t l = 0; l < len; ++l) {
        if (l + AHEAD < len) prefetch_row(k_pool + (int64_t)slots[l + AHEAD] * row, hkv * dim * 4);
        const float *kr0 = k_pool + (int64_t)slots[l] * row;
        for (int64_t hg = 0; hg < hq; ++hg) {
            const vf *kr = (const vf *)(kr0 + (hg / group) * dim), *qg = (const vf *)(q + hg * dim);
            vf acc = {0};
            for (int64_t c = 0; c < nc; ++c) acc += qg[c] * kr[c];
            scores[hg * len + l] = hsum(acc) * scale;
        }
    }
    for (int64_t hg = 0; hg < hq; ++hg) {
        float *s = scores + hg * len;
        float top = -INFINITY;
        for (int64_t l = 0; l < len; ++l) top = s[l] > top ? s[l] : top;
        exp_rows(s, -top, s, len);
        float total = 0.0f;
        for (int64_t l = 0; l < len; ++l) total += s[l];
        const float inv = 1.0f / total;
        for (int64_t l = 0; l < len; ++l) s[l] *= inv;
    }
    for (int64_t hg = 0; hg < hq; ++hg) {
        const float *s = scores + hg * len;
        const float *vh = v_pool + (hg / group) * dim;
        vf acc[nc];
        for (int64_t c = 0; c < nc; ++c) acc[c] = (vf){0};
        for (int64_t l = 0; l < len; ++l) {
            if (hg == 0 && l + AHEAD < len) prefetch_row(v_pool + (int64_t)slots[l + AHEAD] * row, hkv * dim * 4);
            const vf *vr = (const vf *)(vh + (int64_t)slots[l] * row);
            const float p = s[l];
            for (int64_t c = 0; c < nc; ++c) acc[c] += p * vr[c];
        }
        for (int64_t c = 0; c < nc; ++c) memcpy(out + hg * dim + c * W, &acc[c], sizeof(vf));
    }
}

static void attend_any(const float *q, const float *k_pool, const float *v_pool, const int32_t *slots, int64_t len,
                       int64_t hq, int64_t hkv, int64_t dim, int64_t row, float scale, float *scores, float *out) {
    switch (dim) {
    case 64: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, 64, row, scale, scores, out); break;
    case 128: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, 128, row, scale, scores, out); break;
    default: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, dim, row, scale, scores, out);
    }
}

int radixlm_decode_attention_f32(const float *q, const float *k_pool, const float *v_pool,
                                 const int32_t *req_to_token, int64_t r2t_stride, const int64_t *req_rows,
                                 const int64_t *seq_lens, int64_t batch, int64_t hq, int64_t hkv, int64_t dim,
                                 float scale, float *out, int num_threads) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < batch; ++b) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
    /* Work item: one request, or, when there are fewer requests than threads (batch-1 decode), one KV
     * head of a request with its query heads (the same sums; a slot's K/V row is hkv * dim floats). */
    const int split = batch < num_threads && hkv > 1;
    const int64_t items = split ? batch * hkv : batch, heads = split ? hq / hkv : hq, kv = split ? 1 : hkv;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && items > 1)
    {
        float *scores = (float *)malloc((size_t)(heads * max_len) * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            if (scores == NULL) continue;
            const int64_t b = split ? item / hkv : item, h = split ? item % hkv : 0;
            attend_any(q + b * hq * dim + h * heads * dim, k_pool + h * dim, v_pool + h * dim,
                       req_to_token + req_rows[b] * r2t_stride, seq_lens[b], heads, kv, dim, hkv * dim, scale, scores,
                       out + b * hq * dim + h * heads * dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ---- The small ops of a decode layer, one call each instead of several torch dispatches. ---- */

#define ROWS_PER_THREAD 64 /* rows from which the row loops below use OpenMP threads (prefill) */

static inline float inv_rms(const float *x, int64_t dim, float eps) {
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t d = 0; d < dim; ++d) total += x[d] * x[d];
    return 1.0f / sqrtf(total / (float)dim + eps);
}

/* out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, the rounding order of ops_ref.rms_norm_ref. */
void radixlm_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t rows,
                          int64_t dim, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows >= ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        float *o = out + r * dim;
        const float inv = inv_rms(xr, dim, eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = (xr[d] * inv) * w[d];
    }
}

/* summed = x + residual; normed = rms_norm(summed) (ops_ref.fused_add_rms_norm_ref). */
void radixlm_add_rms_norm_f32(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
                              const float *w, float eps, float *normed, float *summed, int64_t rows, int64_t dim,
                              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows >= ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride, *rr = residual + r * r_stride;
        float *s = summed + r * dim, *o = normed + r * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) s[d] = xr[d] + rr[d];
        const float inv = inv_rms(s, dim, eps);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = (s[d] * inv) * w[d];
    }
}

/* Neox rotary of one token's heads: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin], as
 * cpu_ops.rotary_cpu computes it (x * [cos|cos] + roll(x) * [-sin|sin], no fused multiply-add:
 * the file is built with -ffp-contract=off), so bit for bit equal to the reference. */
static void rotate_heads(const float *x, int64_t heads, int64_t dim, const float *cos2, const float *sin2, float *o) {
    const int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; ++h) {
        const float *xh = x + h * dim;
        float *oh = o + h * dim;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) oh[d] = xh[d] * cos2[d] + xh[d + half] * sin2[d];
#pragma omp simd
        for (int64_t d = half; d < dim; ++d) oh[d] = xh[d] * cos2[d] + xh[d - half] * sin2[d];
    }
}

/* q [T, hq, dim] and k [T, hkv, dim] (token strides q_stride / k_stride, heads dense) -> q_out, k_out
 * contiguous; cos2 / sin2 [T, dim] = [cos|cos] and [-sin|sin] of each token's position. */
void radixlm_rotary_f32(const float *q, int64_t q_stride, int64_t hq, const float *k, int64_t k_stride, int64_t hkv,
                        int64_t dim, const float *cos2, const float *sin2, float *q_out, float *k_out, int64_t tokens,
                        int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && tokens >= ROWS_PER_THREAD)
    for (int64_t t = 0; t < tokens; ++t) {
        rotate_heads(q + t * q_stride, hq, dim, cos2 + t * dim, sin2 + t * dim, q_out + t * hq * dim);
        rotate_heads(k + t * k_stride, hkv, dim, cos2 + t * dim, sin2 + t * dim, k_out + t * hkv * dim);
    }
}

/* x [T, 2 * inter] = [gate | up] (row stride x_stride) -> out [T, inter] = silu(gate) * up. */
void radixlm_silu_mul_f32(const float *x, int64_t x_stride, float *out, int64_t rows, int64_t inter, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (num_threads > 1 && rows >= ROWS_PER_THREAD)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = x + r * x_stride, *u = g + inter;
        float *o = out + r * inter;
        float e[256];
        for (int64_t i0 = 0; i0 < inter; i0 += 256) { /* exp(-g) by blocks, then the quotient */
            const int64_t n = inter - i0 < 256 ? inter - i0 : 256;
            for (int64_t i = 0; i < n; ++i) e[i] = -g[i0 + i];
            exp_rows(e, 0.0f, e, n);
            for (int64_t i = 0; i < n; ++i) o[i0 + i] = g[i0 + i] / (1.0f + e[i]) * u[i0 + i];
        }
    }
}
