"""The host side of cascade decode attention: groups of rows, and their fixed-shape work list.

Kept free of triton (the CPU path's torch reference and the scheduler's planner import it); the
kernel is kernels/cascade_attention.py, which reads its launch parameters from here so that the
layout and the kernel agree on rows per program and block size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Launch parameters on the GPU (module-level: benchmarks/cascade_attention.py sweeps them).
# block_m = query rows x heads per program: 64 = 16 requests of a Llama GQA group of 4.
# fused_merge: one-split steps fold the LSE merge into the suffix pass (kernels/cascade_attention.py).
GPU_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2, "fused_merge": True}
INTERPRETER_CONFIG = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1, "fused_merge": True}
MAX_PREFIX_SPLITS = 8  # partial slots per row for its prefix (stage 2 merges them)
MIN_SPLIT_TOKENS = 128  # a prefix task reads at least this many tokens (two blocks; the sweep tries 256)
TASK_FIELDS = 6  # row offset, row count, kv start, kv end, prefix slot, request row


@dataclass(frozen=True)
class CascadeGroup:
    """Batch rows whose first `prefix_len` KV positions are the same pool slots."""

    rows: tuple[int, ...]
    prefix_len: int


@dataclass(frozen=True, eq=False)
class CascadeLayout:
    """One batch's cascade work, as fixed-shape int32 tensors (host or device).

    rows           [n] batch rows in group order (task row ranges index it)
    kv_start       [B] where each row's own KV starts (its group's prefix length; 0 if ungrouped)
    prefix_splits  [B] how many prefix partial slots stage 2 merges for the row (0 if ungrouped)
    tasks          [max_tasks, TASK_FIELDS]
    groups         the host description the layout was built from (the torch reference reads it)
    """

    rows: torch.Tensor
    kv_start: torch.Tensor
    prefix_splits: torch.Tensor
    tasks: torch.Tensor
    max_prefix_splits: int = MAX_PREFIX_SPLITS
    groups: tuple[CascadeGroup, ...] = ()

    def tensors(self) -> list[torch.Tensor]:
        return [self.rows, self.kv_start, self.prefix_splits, self.tasks]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> CascadeLayout:
        """The same layout over other copies of its tensors (e.g. moved to the device in one pack)."""
        rows, kv_start, prefix_splits, tasks = tensors
        return replace(self, rows=rows, kv_start=kv_start, prefix_splits=prefix_splits,
                       tasks=tasks.view(-1, TASK_FIELDS))

    def to(self, device: torch.device | str) -> CascadeLayout:
        return self.with_tensors([t.to(device) for t in self.tensors()])


@dataclass(frozen=True)
class CascadeShape:
    """What the layout must know of the kernel: rows per program, task capacity, balance target."""

    rows_per_task: int
    max_tasks: int
    target_tasks: int
    block_n: int

    @classmethod
    def for_device(cls, num_q_heads: int, num_kv_heads: int, device: torch.device) -> CascadeShape:
        cfg = GPU_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG
        group = num_q_heads // num_kv_heads
        block_m = max(cfg["block_m"], _next_pow2(group))
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        # Balance for ~2 (task, KV head) programs per SM; room for 8. On the H200 at (e)'s shape
        # (benchmarks/cascade_e.py, 2026-12-04): 512 rows in 32 items, 1 / 2 / 3 prefix splits (256 /
        # 512 / 768 programs) 136.7 / 146.3 / 156.2 us; 256 rows (16 items), 1 / 2 / 4 splits 92.6 / 82.0
        # / 92.7 us: fewer float32 partials to write and merge, as long as the programs fill the GPU.
        target = max(1, _cdiv(2 * sms, num_kv_heads))
        room = max(1, _cdiv(4 * sms, num_kv_heads))
        return cls(rows_per_task=block_m // group, max_tasks=2 * room, target_tasks=target, block_n=cfg["block_n"])


def empty_layout(batch_size: int, shape: CascadeShape, device: torch.device | str = "cpu") -> CascadeLayout:
    """No groups: every task empty (what a CUDA graph is captured with, and padding rows get)."""
    z = torch.zeros(max(batch_size, 1), dtype=torch.int32, device=device)
    return CascadeLayout(rows=z.clone(), kv_start=z.clone(), prefix_splits=z.clone(),
                         tasks=torch.zeros(shape.max_tasks, TASK_FIELDS, dtype=torch.int32, device=device))


def build_cascade_layout(groups: Sequence[CascadeGroup], req_pool_indices: Sequence[int], shape: CascadeShape,
                         *, min_split: int = MIN_SPLIT_TOKENS) -> CascadeLayout:
    """Host layout of `groups` (ordered most valuable first) for a batch of len(req_pool_indices) rows.

    Each group is cut into items of at most `rows_per_task` rows; each item's prefix into up to
    MAX_PREFIX_SPLITS tasks of at least `min_split` tokens, so that about `target_tasks` tasks cover
    the batch's prefix work (a prefix's split count rounded to the nearest). Groups that do not fit
    `max_tasks` are left out (plain decode rows).
    """
    bsz = len(req_pool_indices)
    kept: list[CascadeGroup] = []
    items: list[tuple[int, int, int]] = []  # (kept group, row offset, row count)
    offset = 0
    for g in groups:
        if g.prefix_len <= 0 or not g.rows:
            continue
        n_items = _cdiv(len(g.rows), shape.rows_per_task)
        if len(items) + n_items > shape.max_tasks:
            break
        for k in range(n_items):
            items.append((len(kept), offset + k * shape.rows_per_task,
                          min(shape.rows_per_task, len(g.rows) - k * shape.rows_per_task)))
        kept.append(g)
        offset += len(g.rows)
    work = sum(kept[k].prefix_len for k, _, _ in items)
    chunk = max(min_split, _cdiv(work, shape.target_tasks))
    while True:  # per group: tasks of ~chunk tokens, whole blocks, at most MAX_PREFIX_SPLITS
        split_lens = []
        for g in kept:
            n = min(MAX_PREFIX_SPLITS, max(1, (2 * g.prefix_len + chunk) // (2 * chunk)))  # nearest
            split_lens.append(_cdiv(_cdiv(g.prefix_len, n), shape.block_n) * shape.block_n)
        if sum(_cdiv(kept[k].prefix_len, split_lens[k]) for k, _, _ in items) <= shape.max_tasks:
            break
        chunk *= 2
    tasks = [[0] * TASK_FIELDS for _ in range(shape.max_tasks)]
    n = max(bsz, 1)
    rows, kv_start, prefix_splits = [0] * n, [0] * n, [0] * n
    t = 0
    for k, row_off, count in items:
        g, split_len = kept[k], split_lens[k]
        for j, lo in enumerate(range(0, g.prefix_len, split_len)):
            tasks[t] = [row_off, count, lo, min(lo + split_len, g.prefix_len), j, req_pool_indices[g.rows[0]]]
            t += 1
    offset = 0
    for g, split_len in zip(kept, split_lens):
        for r in g.rows:
            rows[offset] = r
            kv_start[r] = g.prefix_len
            prefix_splits[r] = _cdiv(g.prefix_len, split_len)
            offset += 1

    def i32(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return CascadeLayout(rows=i32(rows), kv_start=i32(kv_start), prefix_splits=i32(prefix_splits), tasks=i32(tasks),
                         groups=tuple(kept))
