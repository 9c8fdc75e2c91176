/* A whole decode forward of a Llama-family stack with 4-bit weights, one C call per step (issue 20).
 *
 * A batch-1 CPU decode step of a small model is mostly dispatch: ~30 torch / ctypes calls a layer,
 * a few microseconds each, around matmuls that take tens. Here the layers run back to back in C
 * with the kernels the per-op path uses (cpu_decode_kernels.c: RMSNorm, add + RMSNorm, rotary, paged
 * decode attention, SiLU-and-mul; cpu_int4_gemv.c: the four projections), so the step's result is
 * the per-op path's, op for op. The Python side (runtime/cpu_decode_step.py) decides when it applies
 * (float32, 4-bit layers, no q/k norm or bias, a float KV pool, <= 8 rows) and keeps the other path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void radixlm_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float eps, float *out, int64_t rows,
                          int64_t dim, int num_threads);
void radixlm_add_rms_norm_f32(const float *x, int64_t x_stride, const float *residual, int64_t r_stride,
                              const float *w, float eps, float *normed, float *summed, int64_t rows, int64_t dim,
                              int num_threads);
void radixlm_rotary_f32(const float *q, int64_t q_stride, int64_t hq, const float *k, int64_t k_stride, int64_t hkv,
                        int64_t dim, const float *cos2, const float *sin2, float *q_out, float *k_out, int64_t tokens,
                        int num_threads);
void radixlm_silu_mul_f32(const float *x, int64_t x_stride, float *out, int64_t rows, int64_t inter, int num_threads);
int radixlm_decode_attention_f32(const float *q, const float *k_pool, const float *v_pool,
                                 const int32_t *req_to_token, int64_t r2t_stride, const int64_t *req_rows,
                                 const int64_t *seq_lens, int64_t batch, int64_t hq, int64_t hkv, int64_t dim,
                                 float scale, float *out, int num_threads);
int radixlm_int4_gemv(const float *x, int64_t x_stride, int64_t m_rows, const uint8_t *w, int64_t n, int64_t k,
                      int64_t planes, float *out, int num_threads);

typedef struct { /* one layer (ctypes mirror: runtime/cpu_decode_step.py LayerArgs) */
    const float *input_norm, *post_norm;            /* [H] */
    const uint8_t *qkv, *o, *gate_up, *down;        /* int4_cpu.gemv_blocks */
    int64_t qkv_planes, o_planes, gate_up_planes, down_planes;
    float *k_pool, *v_pool;                         /* [slots, hkv, dim] float32 */
} LayerArgs;

typedef struct { /* the step (ctypes mirror: StepArgs) */
    int64_t rows, hidden, hq, hkv, dim, inter;
    float eps, sm_scale;
    const float *cos2, *sin2;                       /* [rows, dim]: [cos|cos], [-sin|sin] */
    const int64_t *out_loc;                         /* [rows] the new tokens' KV slots */
    const int32_t *req_to_token;
    int64_t r2t_stride;
    const int64_t *req_rows, *seq_lens;             /* [rows] */
    int num_threads;
} StepArgs;

/* hidden [rows, H]: the embeddings in, the last layer's output out; residual [rows, H]: its residual
 * stream (hidden + residual is the stack's output, as LlamaForCausalLM.forward). 0, or < 0 on failure. */
int radixlm_decode_stack(const LayerArgs *layers, int64_t n_layers, const StepArgs *st, float *hidden,
                         float *residual) {
    const int64_t b = st->rows, h = st->hidden, q_size = st->hq * st->dim, kv_size = st->hkv * st->dim;
    const int64_t qkv_size = q_size + 2 * kv_size, th = st->num_threads;
    const size_t floats = (size_t)b * (h + qkv_size + 2 * q_size + kv_size + 3 * st->inter);
    float *buf = malloc(floats * sizeof(float));
    if (buf == NULL) return -2;
    float *normed = buf, *qkv = normed + b * h, *q = qkv + b * qkv_size, *attn = q + b * q_size;
    float *k = attn + b * q_size, *gate_up = k + b * kv_size, *act = gate_up + 2 * b * st->inter;
    int status = 0;
    for (int64_t i = 0; i < n_layers && status == 0; ++i) {
        const LayerArgs *L = layers + i;
        if (i == 0) {
            memcpy(residual, hidden, (size_t)b * h * sizeof(float));
            radixlm_rms_norm_f32(hidden, h, L->input_norm, st->eps, normed, b, h, th);
        } else {
            radixlm_add_rms_norm_f32(hidden, h, residual, h, L->input_norm, st->eps, normed, residual, b, h, th);
        }
        status |= radixlm_int4_gemv(normed, h, b, L->qkv, qkv_size, h, L->qkv_planes, qkv, th);
        radixlm_rotary_f32(qkv, qkv_size, st->hq, qkv + q_size, qkv_size, st->hkv, st->dim, st->cos2, st->sin2, q, k,
                           b, th);
        for (int64_t r = 0; r < b; ++r) {
            memcpy(L->k_pool + st->out_loc[r] * kv_size, k + r * kv_size, kv_size * sizeof(float));
            memcpy(L->v_pool + st->out_loc[r] * kv_size, qkv + r * qkv_size + q_size + kv_size, kv_size * sizeof(float));
        }
        status |= radixlm_decode_attention_f32(q, L->k_pool, L->v_pool, st->req_to_token, st->r2t_stride, st->req_rows,
                                               st->seq_lens, b, st->hq, st->hkv, st->dim, st->sm_scale, attn, th);
        status |= radixlm_int4_gemv(attn, q_size, b, L->o, h, q_size, L->o_planes, hidden, th);
        radixlm_add_rms_norm_f32(hidden, h, residual, h, L->post_norm, st->eps, normed, residual, b, h, th);
        status |= radixlm_int4_gemv(normed, h, b, L->gate_up, 2 * st->inter, h, L->gate_up_planes, gate_up, th);
        radixlm_silu_mul_f32(gate_up, 2 * st->inter, act, b, st->inter, th);
        status |= radixlm_int4_gemv(act, st->inter, b, L->down, h, st->inter, L->down_planes, hidden, th);
    }
    free(buf);
    return status;
}
