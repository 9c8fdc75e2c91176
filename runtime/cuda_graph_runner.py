"""CUDA-graph capture of the decode step for a set of batch-size buckets.

A decode step of a small model is dozens of tiny kernels per layer; launching them one by one is
CPU-bound. Each bucket's forward (embedding to the final norm) is captured once and replayed with
the batch copied into static buffers; padded rows point at a reserved request row whose slots are
the scratch slot 0. The LM head runs after the replay, outside the graph: a graph's output stays
allocated for its lifetime, and [bs, vocab] float32 logits for every bucket up to 1,024 would hold
gigabytes, while the hidden states are 30x smaller and the head is one matmul launch.

With --enable-lora each bucket has two graphs: one with the LoRA kernels (reading the segments
from fixed buffers) and one without, replayed when no row of the step uses an adapter, so base-model
traffic on a LoRA server runs the base model's graph. Both share one memory pool.

With cascade attention (runtime/cascade.py) each bucket of at least two rows also has a graph whose
decode attention reads a fixed-shape cascade layout from static buffers (captured with no groups),
replayed for the steps whose planner grouped rows by shared prefix.

The small buckets whose decode attention splits each row's KV over many programs (32 at batch 1 on the
H200) also have a short-context graph with fewer splits (`decode_attention.short_context_splits`),
replayed while the step's longest context fits them: the same partial results, fewer empty programs.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch

from radixlm.kernels import AttentionMetadata
from radixlm.kernels.cascade_layout import CascadeLayout, empty_layout
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixlm.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def batch_size_buckets(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8, 12, 16, 24] + list(range(32, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [1]


class CudaGraphRunner:
    def __init__(self, runner: "ModelRunner", max_bs: int, pad_row: int) -> None:
        self.runner = runner
        self.buckets = batch_size_buckets(max_bs)
        self.max_bs = self.buckets[-1]
        self.pad_row = pad_row
        dev = runner.device
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(n, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.full((n,), pad_row, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        # (bucket, with LoRA kernels, with cascade attention) -> graph; without --enable-lora only the
        # base-only variants, without a cascade planner only plain decode attention
        loras = (False, True) if runner.lora is not None else (False,)
        cascades = (False, True) if runner.cascade is not None else (False,)
        self.variants = [(lora, cascade) for lora in loras for cascade in cascades]
        self.cascade: CascadeLayout | None = None
        if runner.cascade is not None:
            empty = empty_layout(n, runner.cascade.shape, dev)
            self.cascade = empty.with_tensors([t.to(torch.int64) for t in empty.tensors()])
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool, bool], torch.Tensor] = {}
        self.aux_outputs: dict[tuple[int, bool, bool], torch.Tensor] = {}  # EAGLE-3: the aux hidden states
        self.capture_s: dict[str, float] = {}  # seconds spent capturing each variant (all buckets)
        self.metas: dict[tuple[int, bool], AttentionMetadata] = {}
        # the short-context plan's graphs, keyed (bucket, with LoRA kernels), and the longest context they serve
        self.short_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.short_outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.short_aux_outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.short_max_len = 0
        self.pool = torch.cuda.graph_pool_handle()
        self._capture_all()

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            req_pool_indices_cpu=[self.pad_row] * bs, seq_lens_cpu=[1] * bs, extend_seq_lens_cpu=[1] * bs,
            extend_seq_lens=self.seq_lens[:bs], extend_start_loc=self.logits_indices[:bs],
            logits_indices=self.logits_indices[:bs],
        )

    def _run(self, bs: int, lora: bool, cascade: bool, meta: AttentionMetadata | None = None) -> torch.Tensor:
        attn = self.runner.attn_backend
        attn.meta = meta if meta is not None else self.metas[bs, cascade]
        if self.runner.lora is not None:  # the LoRA kernels read the segments from fixed buffers
            self.runner.lora.use_graph_segments(bs if lora else None)
        return self.runner.model(self._batch(bs), attn)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        for cascade in sorted({c for _, c in self.variants}):
            try:
                self._capture_buckets(cascade)
            except Exception:  # a cascade kernel that cannot run here must not stop the server
                if not cascade:
                    raise
                logger.exception("cascade attention disabled: capturing its decode graphs failed")
                for key in [k for k in self.graphs if k[2]]:
                    del self.graphs[key], self.outputs[key]
                self.runner.cascade = None
                self.variants = [(lora, c) for lora, c in self.variants if not c]
        try:
            self._capture_short()
        except Exception:  # an optional speed-up: the full-split graphs serve every step without it
            logger.exception("short-context decode graphs disabled: capturing them failed")
            self.short_graphs.clear()
            self.short_outputs.clear()
            self.short_aux_outputs.clear()
        logger.info("captured CUDA graphs for decode batch sizes %s (%s)", self.buckets,
                    ", ".join(f"{k} {v:.1f} s" for k, v in self.capture_s.items()))

    def _capture_buckets(self, cascade: bool, only: Collection[int] | None = None) -> None:
        """Capture every bucket's graphs of one variant (`only`: those buckets; benchmarks recapture
        one after changing a kernel's launch settings, e.g. benchmarks/cascade_e.py)."""
        attn = self.runner.attn_backend
        for bs in reversed(self.buckets):
            if (cascade and bs < 2) or (only is not None and bs not in only):
                continue
            self.metas[bs, cascade] = AttentionMetadata.for_decode(
                attn.req_to_token, self.req_pool_indices[:bs], self.seq_lens[:bs],
                cascade=self._cascade_view(bs) if cascade else None,
            )
            for lora in sorted({lora for lora, c in self.variants if c == cascade}):
                started = time.perf_counter()
                for _ in range(2):  # compile Triton kernels and warm allocators outside the capture
                    self._run(bs, lora, cascade)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[bs, lora, cascade] = self._run(bs, lora, cascade)
                if self.runner.model.aux_layers:
                    self.aux_outputs[bs, lora, cascade] = self.runner.model.aux_hidden
                self.graphs[bs, lora, cascade] = graph
                torch.cuda.synchronize()
                key = ("lora" if lora else "base") + ("+cascade" if cascade else "")
                self.capture_s[key] = self.capture_s.get(key, 0.0) + time.perf_counter() - started

    def _capture_short(self) -> None:
        """The short-context graphs (see the module docstring): plain attention, every LoRA variant."""
        attn = self.runner.attn_backend
        if not attn.ops.name.startswith("triton"):
            return  # the torch reference attention takes no split count
        from radixlm.kernels.decode_attention import short_context_splits

        started = time.perf_counter()
        kv_heads = self.runner.kv_pool.k_buffer[0].shape[1]
        for bs in reversed(self.buckets):
            plan = short_context_splits(bs, kv_heads, self.runner.device)
            if plan is None:
                continue
            splits, self.short_max_len = plan
            meta = AttentionMetadata.for_decode(attn.req_to_token, self.req_pool_indices[:bs], self.seq_lens[:bs],
                                                num_kv_splits=splits)
            for lora in sorted({lora for lora, c in self.variants if not c}):
                for _ in range(2):
                    self._run(bs, lora, False, meta)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.short_outputs[bs, lora] = self._run(bs, lora, False, meta)
                if self.runner.model.aux_layers:
                    self.short_aux_outputs[bs, lora] = self.runner.model.aux_hidden
                self.short_graphs[bs, lora] = graph
                torch.cuda.synchronize()
        if self.short_graphs:
            self.capture_s["short-context"] = time.perf_counter() - started

    def _cascade_view(self, bs: int) -> CascadeLayout:
        assert self.cascade is not None
        c = self.cascade
        return c.with_tensors([c.rows[:bs], c.kv_start[:bs], c.prefix_splits[:bs], c.tasks])

    def _copy_cascade(self, layout: CascadeLayout, bs: int, padded: int) -> None:
        """The step's layout into the static buffers; padding rows attend plainly (no prefix)."""
        assert self.cascade is not None
        c = self.cascade
        c.rows[:bs].copy_(layout.rows[:bs])
        c.kv_start[:bs].copy_(layout.kv_start[:bs])
        c.prefix_splits[:bs].copy_(layout.prefix_splits[:bs])
        c.tasks.copy_(layout.tasks)
        c.kv_start[bs:padded].zero_()
        c.prefix_splits[bs:padded].zero_()

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.mode is ForwardMode.DECODE and batch.batch_size <= self.max_bs

    def replay(self, batch: ForwardBatch, lora: bool = False) -> torch.Tensor:
        """`lora`: some row uses an adapter (the manager has filled the segment buffers)."""
        bs = batch.batch_size
        padded = self.buckets[bisect.bisect_left(self.buckets, bs)]
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.req_pool_indices[:bs].copy_(batch.req_pool_indices)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if padded > bs:
            self.input_ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()
            self.req_pool_indices[bs:padded].fill_(self.pad_row)
            self.seq_lens[bs:padded].fill_(1)
        cascade = batch.cascade is not None and (padded, lora, True) in self.graphs
        if cascade:
            self._copy_cascade(batch.cascade, bs, padded)  # type: ignore[arg-type]
        elif (padded, lora) in self.short_graphs and batch.max_seq_len <= self.short_max_len:
            self.short_graphs[padded, lora].replay()
            if self.short_aux_outputs:
                self.runner.model.aux_hidden = self.short_aux_outputs[padded, lora][:bs]
            return self.runner.model.compute_logits(self.short_outputs[padded, lora][:bs])
        self.graphs[padded, lora, cascade].replay()
        if self.aux_outputs:
            self.runner.model.aux_hidden = self.aux_outputs[padded, lora, cascade][:bs]
        return self.runner.model.compute_logits(self.outputs[padded, lora, cascade][:bs])
