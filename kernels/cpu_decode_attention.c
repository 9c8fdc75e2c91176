/* Paged decode attention on the CPU, float32 (issue 20; loaded by kernels/cpu_native.py).
 *
 * One query token per request attends to its KV slots read in place from the token-level pool
 * (req_to_token[row, 0:len] -> slot -> k_pool[slot, h, :]), so no [B, L, H, D] copy of every
 * row's K/V is gathered per layer. Work item = (request, KV head): the query heads sharing that
 * KV head are scored against each K row while it is in L1, then a softmax, then the V rows.
 * Items are spread over OpenMP threads (torch's own libgomp when torch is loaded first).
 *
 * Same math as kernels/attention_ref.decode_attention_ref in float32 (max-subtracted softmax);
 * only the summation order differs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64), aligned(4)));
#define W 16
#define AHEAD 6

static inline float hsum(vf x) {
    typedef float v8 __attribute__((vector_size(32), aligned(4)));
    v8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7), b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v8 s = a + b;
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

static inline void prefetch_row(const float *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)row + o, 0, 3);
}

static inline __attribute__((always_inline)) void attend_request(
    const float *q, const float *k_pool, const float *v_pool, const int32_t *slots, int64_t len, int64_t hq,
    int64_t hkv, const int64_t dim, float scale, float *scores, float *out) {
    const int64_t row = hkv * dim, group = hq / hkv, nc = dim / W;
    for (int64_t l = 0; l < len; ++l) {
        if (l + AHEAD < len) prefetch_row(k_pool + (int64_t)slots[l + AHEAD] * row, row * 4);
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
        float total = 0.0f;
        for (int64_t l = 0; l < len; ++l) {
            s[l] = expf(s[l] - top);
            total += s[l];
        }
        const float inv = 1.0f / total;
        for (int64_t l = 0; l < len; ++l) s[l] *= inv;
    }
    for (int64_t hg = 0; hg < hq; ++hg) {
        const float *s = scores + hg * len;
        const float *vh = v_pool + (hg / group) * dim;
        vf acc[nc];
        for (int64_t c = 0; c < nc; ++c) acc[c] = (vf){0};
        for (int64_t l = 0; l < len; ++l) {
            if (hg == 0 && l + AHEAD < len) prefetch_row(v_pool + (int64_t)slots[l + AHEAD] * row, row * 4);
            const vf *vr = (const vf *)(vh + (int64_t)slots[l] * row);
            const float p = s[l];
            for (int64_t c = 0; c < nc; ++c) acc[c] += p * vr[c];
        }
        for (int64_t c = 0; c < nc; ++c) memcpy(out + hg * dim + c * W, &acc[c], sizeof(vf));
    }
}

static void attend_any(const float *q, const float *k_pool, const float *v_pool, const int32_t *slots, int64_t len,
                       int64_t hq, int64_t hkv, int64_t dim, float scale, float *scores, float *out) {
    switch (dim) {
    case 64: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, 64, scale, scores, out); break;
    case 128: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, 128, scale, scores, out); break;
    default: attend_request(q, k_pool, v_pool, slots, len, hq, hkv, dim, scale, scores, out);
    }
}

int radixlm_decode_attention_f32(const float *q, const float *k_pool, const float *v_pool,
                                 const int32_t *req_to_token, int64_t r2t_stride, const int64_t *req_rows,
                                 const int64_t *seq_lens, int64_t batch, int64_t hq, int64_t hkv, int64_t dim,
                                 float scale, float *out, int num_threads) {
    int64_t max_len = 0;
    for (int64_t b = 0; b < batch; ++b) max_len = seq_lens[b] > max_len ? seq_lens[b] : max_len;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1 && batch > 1)
    {
        float *scores = (float *)malloc((size_t)(hq * max_len) * sizeof(float));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (scores == NULL) continue;
            attend_any(q + b * hq * dim, k_pool, v_pool, req_to_token + req_rows[b] * r2t_stride, seq_lens[b], hq,
                       hkv, dim, scale, scores, out + b * hq * dim);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
