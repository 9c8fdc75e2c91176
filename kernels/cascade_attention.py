"""Cascade (shared-prefix) decode attention: a group's common prefix is read once for all its rows.

When R decode rows share the first P positions of their KV (the same radix-tree nodes, hence the
same pool slots), plain decode attention reads those P tokens R times. Here the prefix stage reads
them once per group: a program takes up to `rows_per_task` rows of one group and one KV head, so
its queries form a (rows x GQA group) x head_dim tile — the M dimension of `tl.dot` — and streams
the prefix's K/V blocks through it. Each row's own suffix [P, seq_len) runs through decode
attention's stage 1 (a per-row KV start), and decode's stage 2 merges suffix and prefix partials by
log-sum-exp, so the result equals plain decode attention.

The work list is fixed-shape (CUDA-graph friendly): `tasks` has `max_tasks` entries of
(row offset, row count, kv start, kv end, prefix slot, request row); unused entries have row
count 0 and return at once. A long prefix is split into several tasks (slots) so that few groups
still fill the GPU; `build_cascade_layout` balances that from the host-side group list.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .attention_common import gather_kv, online_softmax_step

# Launch parameters on the GPU (module-level: benchmarks/cascade_attention.py sweeps them).
# block_m = query rows x heads per program: 64 = 16 requests of a Llama GQA group of 4.
GPU_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
INTERPRETER_CONFIG = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
MAX_PREFIX_SPLITS = 8  # partial slots per row for its prefix (stage 2 merges them)
MIN_SPLIT_TOKENS = 256  # a prefix task reads at least this many tokens (fewer: launch cost dominates)
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
        block_m = max(cfg["block_m"], triton.next_power_of_2(group))
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        target = max(1, triton.cdiv(4 * sms, num_kv_heads))  # (task, KV head) programs ~ 4 per SM
        return cls(rows_per_task=block_m // group, max_tasks=2 * target, target_tasks=target, block_n=cfg["block_n"])


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
    the batch's prefix work. Groups that do not fit `max_tasks` are left out (plain decode rows).
    """
    bsz = len(req_pool_indices)
    kept: list[CascadeGroup] = []
    items: list[tuple[int, int, int]] = []  # (kept group, row offset, row count)
    offset = 0
    for g in groups:
        if g.prefix_len <= 0 or not g.rows:
            continue
        n_items = triton.cdiv(len(g.rows), shape.rows_per_task)
        if len(items) + n_items > shape.max_tasks:
            break
        for k in range(n_items):
            items.append((len(kept), offset + k * shape.rows_per_task,
                          min(shape.rows_per_task, len(g.rows) - k * shape.rows_per_task)))
        kept.append(g)
        offset += len(g.rows)
    work = sum(kept[k].prefix_len for k, _, _ in items)
    chunk = max(min_split, triton.cdiv(work, shape.target_tasks))
    while True:  # per group: tasks of ~chunk tokens, whole blocks, at most MAX_PREFIX_SPLITS
        split_lens = []
        for g in kept:
            n = min(MAX_PREFIX_SPLITS, triton.cdiv(g.prefix_len, chunk))
            split_lens.append(triton.cdiv(triton.cdiv(g.prefix_len, n), shape.block_n) * shape.block_n)
        if sum(triton.cdiv(kept[k].prefix_len, split_lens[k]) for k, _, _ in items) <= shape.max_tasks:
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
            prefix_splits[r] = triton.cdiv(g.prefix_len, split_len)
            offset += 1

    def i32(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return CascadeLayout(rows=i32(rows), kv_start=i32(kv_start), prefix_splits=i32(prefix_splits), tasks=i32(tasks),
                         groups=tuple(kept))


@triton.jit
def _prefix_stage(
    Q, K, V, ReqToToken, Tasks, Rows, MidO, MidLse,
    qk_scale, v_scale, num_splits,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_r2t,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    task = Tasks + t * 6
    row_off = tl.load(task)
    row_cnt = tl.load(task + 1)
    kv_start = tl.load(task + 2)
    kv_end = tl.load(task + 3)
    slot = tl.load(task + 4)
    req_row = tl.load(task + 5).to(tl.int64)
    if row_cnt == 0:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    i = offs_m // GROUP  # the tile's row (request) ...
    heads = kvh * GROUP + offs_m % GROUP  # ... and q head
    mask_m = (i < row_cnt) & (i < ROWS)
    mask_d = offs_d < HEAD_DIM
    b = tl.load(Rows + row_off + i, mask=mask_m, other=0).to(tl.int64)
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    r2t = ReqToToken + req_row * stride_r2t  # the prefix's slots: the same in every row of the group

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < kv_end
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)

    out = acc / l_i[:, None] * v_scale
    part = num_splits + slot
    tl.store(MidO + b[:, None] * stride_mb + heads[:, None] * stride_mh + part * stride_ms + offs_d[None, :],
             out, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + part, m_i + tl.log2(l_i), mask=mask_m)


def launch_prefix_stage(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                        layout: CascadeLayout, mid_o: torch.Tensor, mid_lse: torch.Tensor, num_splits: int,
                        qk_scale: float, v_scale: float, precision: str) -> None:
    """Write each grouped row's prefix partials (slots num_splits + j) for decode's stage 2 to merge."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    on_gpu = q.is_cuda
    cfg = GPU_CONFIG if on_gpu else INTERPRETER_CONFIG
    block_m = max(cfg["block_m"], triton.next_power_of_2(group))
    _prefix_stage[(layout.tasks.shape[0], num_kv_heads)](
        q, k_buffer, v_buffer, req_to_token, layout.tasks, layout.rows, mid_o, mid_lse,
        qk_scale, v_scale, num_splits,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, ROWS=block_m // group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=cfg["block_n"],
        DOT_PRECISION=precision, DOT_FP32=not on_gpu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
