"""The EAGLE-3 head's drafting as one CUDA graph per (batch-size bucket, k): catch-up and k - 1 chain steps.

Eager, every head pass is ~30 kernel launches plus its host work: on the H200 drafting cost 0.85 /
1.66 / 2.41 ms for k = 1 / 2 / 3 at batch 1 against a 4.6 ms decode step, eating the gain. Here a
step's whole draft is one replay: the catch-up of each drafting row's newest entries (at most
C = max_drafts + 1: what one verify step can add), then k - 1 chain steps, each with its argmax and
draft-to-target map, and the head's req_to_token writes, all reading static buffers that one copy
per dtype fills.

The catch-up runs as decode rows, one per entry whose KV length ends at it (as the target's verify
rows do): attention stays causal and the shape is fixed, bs x C rows, the unused ones at the
scratch row (row 0, slot 0). A row with more new entries (its first draft, or after a stretch
without drafting) has the older ones fed by the drafter's eager extend pass first: the head's KV
is the same either way. On the CPU the same body runs eagerly (`capture=False`): the tests check
it drafts exactly what the eager passes draft.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch

from radixlm.kernels import AttentionMetadata
from radixlm.runtime.cuda_graph_runner import batch_size_buckets
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixlm.runtime.speculative.eagle_drafter import EagleDrafter

logger = logging.getLogger(__name__)

MAX_GRAPH_BS = 256  # drafting requests per graph; larger batches draft eagerly (drafting rarely pays there)
# int64 fields (rows of one static buffer): catch-up ids, positions, slots, head rows, KV columns; the
# index of each row's last entry; chain rows; then per chain step its positions, slots and KV columns.
CU_IDS, CU_POS, CU_SLOTS, CU_ROWS, CU_COLS, LAST, CH_ROWS = range(7)
CHAIN_FIELDS = 3


class EagleGraphs:
    def __init__(self, drafter: "EagleDrafter", max_bs: int, capture: bool = True) -> None:
        self.d = drafter
        self.C = drafter.max_drafts + 1
        self.buckets = batch_size_buckets(min(max_bs, MAX_GRAPH_BS))
        self.max_bs = self.buckets[-1]
        dev, width = drafter.device, self.max_bs * self.C
        self.ints = torch.zeros(CH_ROWS + 1 + CHAIN_FIELDS * max(self.C - 2, 0), width, dtype=torch.int64, device=dev)
        self.lens = torch.ones(1 + max(self.C - 2, 0), width, dtype=torch.int32, device=dev)  # KV lengths
        self.hidden = torch.zeros(width, drafter.head.fc.shape[0], dtype=drafter.head.fc.dtype, device=dev)
        self.tokens = torch.zeros(self.max_bs, self.C - 1, dtype=torch.int64, device=dev)
        self.arange = torch.arange(self.max_bs, dtype=torch.int64, device=dev)
        self.capture = capture
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.metas: dict[tuple[int, int], AttentionMetadata] = {}  # (bs, step): step 0 is the catch-up
        for bs in self.buckets:
            self.metas[bs, 0] = AttentionMetadata.for_decode(drafter.rows_pool.req_to_token, self.ints[CU_ROWS, :bs * self.C],
                                                             self.lens[0, :bs * self.C])
            for s in range(1, self.C - 1):
                self.metas[bs, s] = AttentionMetadata.for_decode(drafter.rows_pool.req_to_token, self.ints[CH_ROWS, :bs],
                                                                 self.lens[s, :bs])
        if capture:
            self._capture_all()

    @staticmethod
    def _field(step: int, part: int) -> int:
        return CH_ROWS + 1 + CHAIN_FIELDS * (step - 1) + part

    def fits(self, rows: int, k: int) -> bool:
        return rows <= self.max_bs and 1 <= k < self.C

    # ---------------------------------------------------------------- the graph body
    def _batch(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor,
               lens: torch.Tensor, logits_at: torch.Tensor) -> ForwardBatch:
        n = int(ids.shape[0])
        return ForwardBatch(mode=ForwardMode.DECODE, input_ids=ids, positions=pos, out_cache_loc=slots,
                            req_pool_indices=rows, seq_lens=lens, req_pool_indices_cpu=[0] * n, seq_lens_cpu=[1] * n,
                            extend_seq_lens_cpu=[1] * n, extend_seq_lens=lens, extend_start_loc=self.arange[:n],
                            logits_indices=logits_at)

    def _pass(self, batch: ForwardBatch, meta: AttentionMetadata, cols: torch.Tensor,
              hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One head pass over static fields: record the new entries' slots, run, greedy draft (target ids)."""
        d = self.d
        d.rows_pool.req_to_token[batch.req_pool_indices, cols] = batch.out_cache_loc.to(torch.int32)
        d.attn.meta = meta
        cos_sin = d.cos_sin if d.ops.rotary_table is None else d.ops.rotary_table(batch.positions, d.cos_sin)
        logits, out = d.head(batch, d.attn, d.ops, cos_sin, d.embed(batch.input_ids), hidden)
        return d.head.draft_to_target(logits.argmax(dim=-1)), out

    def _body(self, bs: int, k: int) -> None:
        f, n = self.ints, bs * self.C
        last = f[LAST, :bs]
        tok, out = self._pass(self._batch(f[CU_IDS, :n], f[CU_POS, :n], f[CU_SLOTS, :n], f[CU_ROWS, :n], self.lens[0, :n],
                                          last), self.metas[bs, 0], f[CU_COLS, :n], self.hidden[:n])
        self.tokens[:bs, 0] = tok
        hidden = out[last]
        for s in range(1, k):
            pos, slots, cols = (f[self._field(s, p), :bs] for p in range(CHAIN_FIELDS))
            tok, hidden = self._pass(self._batch(tok, pos, slots, f[CH_ROWS, :bs], self.lens[s, :bs], self.arange[:bs]),
                                     self.metas[bs, s], cols, hidden)
            self.tokens[:bs, s] = tok

    @torch.inference_mode()
    def _capture_all(self) -> None:
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.buckets):
            for k in range(1, self.C):
                for _ in range(2):  # compile kernels, warm the allocator
                    self._body(bs, k)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._body(bs, k)
                self.graphs[bs, k] = graph
        torch.cuda.synchronize()
        logger.info("captured EAGLE-3 drafting graphs for batch sizes %s, k 1..%d (%.1f s)", self.buckets, self.C - 1,
                    time.perf_counter() - started)

    # ---------------------------------------------------------------- replay
    def draft(self, rows: list[int], kv_before: list[int], positions: list[list[int]], ids: list[list[int]],
              hidden: list[torch.Tensor], k: int, slots: torch.Tensor) -> list[list[int]]:
        """Feed each row's entries (at most C; `kv_before` entries already in its head KV) and draft k
        tokens after its last one. `slots`: the catch-up entries' slots in order, then (k - 1) per row
        for the chain. Returns [rows, k] target token ids; the caller cuts the head KV back."""
        n = len(rows)
        bs = self.buckets[bisect.bisect_left(self.buckets, n)]
        width = bs * self.C
        total = sum(len(p) for p in positions)
        host = torch.zeros(self.ints.shape[0], width, dtype=torch.int64)
        lens = torch.ones(self.lens.shape[0], width, dtype=torch.int32)
        slot_list = slots.tolist()
        cu_ids, cu_pos, cu_rows, cu_cols, last = [], [], [], [], []
        for row, before, pos, tok in zip(rows, kv_before, positions, ids):
            cu_ids += tok
            cu_pos += pos
            cu_rows += [row] * len(pos)
            cu_cols += range(before, before + len(pos))
            last.append(len(cu_ids) - 1)
        host[CU_IDS, :total] = torch.tensor(cu_ids)
        host[CU_POS, :total] = torch.tensor(cu_pos)
        host[CU_SLOTS, :total] = torch.tensor(slot_list[:total])
        host[CU_ROWS, :total] = torch.tensor(cu_rows)
        host[CU_COLS, :total] = torch.tensor(cu_cols)
        lens[0, :total] = host[CU_COLS, :total] + 1
        host[LAST, :n] = torch.tensor(last)
        host[CH_ROWS, :n] = torch.tensor(rows)
        h_rows, h_cols, h_slots = list(cu_rows), list(cu_cols), slot_list[:total]
        ends = [b + len(p) for b, p in zip(kv_before, positions)]
        tails = [p[-1] for p in positions]
        for s in range(1, k):
            chain = slot_list[total + (s - 1) * n : total + s * n]
            host[self._field(s, 0), :n] = torch.tensor([t + s for t in tails])
            host[self._field(s, 1), :n] = torch.tensor(chain)
            cols = [e + s - 1 for e in ends]
            host[self._field(s, 2), :n] = torch.tensor(cols)
            lens[s, :n] = torch.tensor(cols) + 1
            h_rows += rows
            h_cols += cols
            h_slots += chain
        d = self.d
        if d.rows_pool.host is not d.rows_pool.req_to_token:  # the mirror the drafter frees from
            d.rows_pool.host[torch.tensor(h_rows), torch.tensor(h_cols)] = torch.tensor(h_slots, dtype=torch.int32)
        self.ints[:, :width].copy_(host)
        self.lens[:, :width].copy_(lens)
        if len(hidden) > 1:
            torch.cat(hidden, out=self.hidden[:total])
        else:
            self.hidden[:total].copy_(hidden[0])
        if self.capture:
            self.graphs[bs, k].replay()
        else:
            self._body(bs, k)
        return self.tokens[:n, :k].tolist()
