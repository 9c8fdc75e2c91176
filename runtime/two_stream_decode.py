"""Large decode batches in two halves on two CUDA streams, so decode attention overlaps the GEMMs.

At ~1,000 rows a decode layer spends about half its time in its four GEMMs, bound by the tensor cores, and half
in decode attention, bound by the KV bytes it reads (workload (b) on the H200: 577 and 591 µs a layer at 1,024
rows); one after the other, each leaves the other's resource idle. Here the batch runs as two halves A and B
whose layers interleave: the main stream runs A's projections, B's projections, A's output and MLP, A's next
projections, B's output and MLP, ..., while a second stream runs A's attention, then B's, each after its own
projections and before its own output — A's attention beside B's GEMMs and the other way round. Each half's
GEMMs read every weight once (twice a layer in all), so only batches large enough to be compute-bound can gain:
`TWO_STREAM_MIN_ROWS`, from the H200 measurement (benchmarks/b_levers.py --items steps). The decode CUDA
graphs capture it (runtime/cuda_graph_runner.py, `--decode-two-streams`): the streams become two branches of
each graph. Without a second stream (the CPU) the same order runs on one stream, with the one-batch forward's
results row for row.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from radixlm.kernels import AttentionMetadata
from radixlm.runtime.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from radixlm.runtime.attention import PagedAttentionBackend
    from radixlm.runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM

TWO_STREAM_MIN_ROWS = 512
# SMs cuBLAS leaves free in the two-stream graphs' GEMMs, for the attention stream's kernels (None: all SMs)
TWO_STREAM_SM_CARVEOUT: int | None = None


@contextmanager
def gemm_sm_carveout(sms: int | None) -> Iterator[None]:
    """cuBLAS GEMMs launched or captured inside leave `sms` SMs free (torch's experimental SM carve-out, read at
    each GEMM's launch, so a captured graph keeps it); None changes nothing."""
    if sms is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def first_half_rows(bs: int) -> int:
    """Rows of half A: half the batch rounded up to a multiple of 8."""
    return min(bs, (bs // 2 + 7) // 8 * 8)


def split_batch(batch: ForwardBatch, rows: int) -> tuple[ForwardBatch, ForwardBatch]:
    """A plain decode batch (one token per row, every row's logits) as rows [0, rows) and [rows, B)."""
    def part(lo: int, hi: int) -> ForwardBatch:
        n = hi - lo
        return replace(
            batch, input_ids=batch.input_ids[lo:hi], positions=batch.positions[lo:hi],
            out_cache_loc=batch.out_cache_loc[lo:hi], req_pool_indices=batch.req_pool_indices[lo:hi],
            seq_lens=batch.seq_lens[lo:hi], req_pool_indices_cpu=batch.req_pool_indices_cpu[lo:hi],
            seq_lens_cpu=batch.seq_lens_cpu[lo:hi], extend_seq_lens_cpu=batch.extend_seq_lens_cpu[lo:hi],
            extend_seq_lens=batch.extend_seq_lens[lo:hi], extend_start_loc=batch.extend_start_loc[:n],
            logits_indices=batch.logits_indices[:n],
        )

    return part(0, rows), part(rows, batch.batch_size)


def half_metadata(attn: PagedAttentionBackend, half: ForwardBatch) -> AttentionMetadata:
    """A half's decode attention metadata, as `attn.begin_forward` builds it for a (non-cascade) batch."""
    if attn.ops.decode_metadata is not None:
        return attn.ops.decode_metadata(attn.req_to_token, half.req_pool_indices, half.seq_lens, half.seq_lens_cpu)
    return AttentionMetadata.for_decode(attn.req_to_token, half.req_pool_indices, half.seq_lens)


class TwoStreamDecode:
    """One decode forward of a model over two halves; `attn_stream` None runs it on the current stream."""

    def __init__(self, model: LlamaForCausalLM, attn: PagedAttentionBackend,
                 halves: tuple[ForwardBatch, ForwardBatch], metas: tuple[AttentionMetadata, AttentionMetadata],
                 attn_stream: torch.cuda.Stream | None) -> None:
        self.model, self.attn, self.halves, self.metas = model, attn, halves, metas
        self.stream = attn_stream
        self.main = torch.cuda.current_stream() if attn_stream is not None else None
        ops = model.ops
        self.cos_sin = [model.cos_sin_cache if ops.rotary_table is None else ops.rotary_table(h.positions, model.cos_sin_cache)
                        for h in halves]
        self.hidden: list[torch.Tensor] = [model.embed_tokens(h.input_ids) for h in halves]
        self.residual: list[torch.Tensor | None] = [None, None]
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None] | None] = [None, None]

    def run(self) -> torch.Tensor:
        """Hidden states after the final norm, the whole batch in order."""
        if self.stream is not None:
            self.stream.wait_stream(self.main)
        layers = self.model.layers
        for n, layer in enumerate(layers):
            if n == 0:
                self._project(0, layer)
            self._project(1, layer)
            self._finish(0, layer)
            if n + 1 < len(layers):
                self._project(0, layers[n + 1])
            self._finish(1, layer)
        if self.stream is not None:
            self.main.wait_stream(self.stream)
        return torch.cat([self.model._final_norm(h, x, r)  # type: ignore[arg-type]
                          for h, x, r in zip(self.halves, self.hidden, self.residual)])

    def _project(self, i: int, layer: LlamaDecoderLayer) -> None:
        """Half i's norm, qkv projection, rotary and KV store (main stream), then its attention (second stream)."""
        ops, attn_mod = self.model.ops, layer.self_attn
        if self.residual[i] is None:
            self.residual[i] = self.hidden[i]
            normed = ops.rms_norm(self.hidden[i], layer.input_layernorm.weight, layer.eps)
        else:
            normed, self.residual[i] = ops.fused_add_rms_norm(self.hidden[i], self.residual[i],
                                                             layer.input_layernorm.weight, layer.eps)
        q, k, v = attn_mod.project(normed, self.halves[i], self.attn, self.cos_sin[i], ops)
        self.attn.meta = self.metas[i]
        if self.stream is None:
            self.pending[i] = (self.attn.forward(q, k, v, attn_mod.layer_id, self.halves[i]), None)
            return
        ready = torch.cuda.Event()
        ready.record(self.main)
        self.stream.wait_event(ready)
        for t in (q, k, v):
            if t is not None:  # the main stream may reuse their memory only after the attention read them
                t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            out = self.attn.forward(q, k, v, attn_mod.layer_id, self.halves[i])
            done = torch.cuda.Event()
            done.record(self.stream)
        out.record_stream(self.main)
        self.pending[i] = (out, done)

    def _finish(self, i: int, layer: LlamaDecoderLayer) -> None:
        """Half i's output projection, add + norm and MLP (main stream), once its attention is done."""
        out, done = self.pending[i]  # type: ignore[misc]
        if done is not None:
            self.main.wait_event(done)
        ops, residual = self.model.ops, self.residual[i]
        hidden = layer.self_attn.output(out, residual)
        normed, self.residual[i] = ops.fused_add_rms_norm(hidden, residual, layer.post_attention_layernorm.weight,
                                                          layer.eps)
        self.hidden[i] = layer.mlp(normed, ops, self.residual[i])
        self.pending[i] = None
