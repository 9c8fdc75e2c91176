"""Token-level KV memory: one slot per token, K and V per layer, plus the request->token map.

Slot 0 is reserved as a scratch slot: padded positions write there, so kernels never need a branch.
An FP8 pool (`--kv-cache-dtype fp8_e4m3 | fp8_e5m2`) stores K / scale and V / scale per layer (the
checkpoint's k_scale / v_scale, else 1.0) in one byte per value: twice the tokens for the same memory.
The store kernels divide by the scale and saturate; the attention kernels multiply it back.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from radixlm.runtime.device_transfer import pack_on, to_device


class ReqToTokenPool:
    """Maps (request row, token position) -> KV slot index.

    Row 0 is never handed out: it stays all zeros (the scratch slot), so padded batch entries
    (CUDA-graph buckets) can point at it.
    """

    pad_row = 0

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str, mirror: bool = False) -> None:
        """`mirror`: a separate host mirror even on the CPU (tests: the device table then sees only what
        reaches it as it would on a GPU)."""
        self.size = max_reqs
        self.capacity = max_reqs - 1
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int32, device=device)
        # The scheduler reads slots on the host (to free or cache them); reading them back from the
        # device would wait for the forward pass in flight. So every write also goes to this mirror.
        cpu = self.req_to_token.device.type == "cpu"
        self.host = self.req_to_token if cpu and not mirror else torch.zeros((max_reqs, max_context_len), dtype=torch.int32)
        self._free_rows: list[int] = list(range(max_reqs - 1, 0, -1))
        self._deferred: list[tuple[int, int, int]] | None = None  # (row, start, end) written inside `deferred_writes`

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """req_to_token[row, start:start+len(slots)] = slots (host tensor), mirror included (inside
        `deferred_writes`, the device table's part when the block ends)."""
        vals = slots.to(torch.int32)
        end = start + int(vals.numel())
        self.host[row, start:end] = vals
        if self.host is self.req_to_token:
            return
        if self._deferred is not None:
            self._deferred.append((row, start, end))  # sent from the mirror at the block's end: its latest values
        else:
            self.req_to_token[row, start:end] = to_device(vals, self.req_to_token.device)

    @contextmanager
    def deferred_writes(self) -> Iterator[None]:
        """The device table's part of every `write` in the block, as one copy and one scatter when it
        ends: an admission writes each cached prefix (a 256-request burst of cached prompts: ~100 µs a
        request on the H200's host as a pinned copy and a slice store each, 2026-12-05). Nothing may
        read the device table inside the block (no forward pass runs in an admission)."""
        if self._deferred is not None:  # nested: the outer block flushes
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            pending, self._deferred = self._deferred, None
            self._flush(pending)

    def _flush(self, pending: list[tuple[int, int, int]]) -> None:
        """The device table's spans `pending` (row, start, end) set from the mirror: one packed copy, one scatter."""
        if not pending:
            return
        if len(pending) == 1:
            row, start, end = pending[0]
            self.req_to_token[row, start:end] = to_device(self.host[row, start:end], self.req_to_token.device)
            return
        lens = torch.tensor([e - s for _, s, e in pending], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.tensor([r for r, _, _ in pending], dtype=torch.int64), lens)
        # each span's positions: start .. end - 1, from one arange less each span's offset in it
        offsets = torch.cumsum(lens, 0) - lens
        starts = torch.tensor([s for _, s, _ in pending], dtype=torch.int64)
        cols = torch.arange(int(lens.sum()), dtype=torch.int64) + torch.repeat_interleave(starts - offsets, lens)
        rows_d, cols_d, vals_d = pack_on([rows, cols], self.req_to_token.device, int32=[self.host[rows, cols]])
        self.req_to_token[rows_d, cols_d] = vals_d

    def slots(self, row: int, start: int, end: int) -> torch.Tensor:
        """The request row's slots [start, end) as an int64 host tensor (no device sync)."""
        return self.host[row, start:end].to(torch.int64)

    def available(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def commit(self, writes: "SlotWrites") -> None:
        """Record a step's new KV slots in their requests' rows, before the forward pass reads them:
        on the host mirror, and (one scatter of tensors already on the device) in req_to_token."""
        if writes.decode:
            self.host[writes.rows, writes.positions] = writes.slots
        else:  # few requests, long runs: slice copies beat a scatter of every token
            start = 0
            for row, prefix, ext in zip(writes.rows.tolist(), writes.prefix_lens, writes.extend_lens):
                self.host[row, prefix : prefix + ext] = writes.slots[start : start + ext]
                start += ext
        if self.req_to_token is not self.host:
            self.req_to_token[writes.device_token_rows, writes.device_positions] = writes.device_slots.to(torch.int32)
        for dst, src, length in writes.lane_copies:  # draft trees: a lane's KV prefix and ancestors
            self.host[dst, :length] = self.host[src, :length]
            if self.req_to_token is not self.host:
                self.req_to_token[dst, :length] = self.req_to_token[src, :length]


@dataclass(frozen=True)
class SlotWrites:
    """Where a step's new KV slots go in req_to_token: host tensors for the mirror, device tensors
    (from the step's one packed copy) for req_to_token itself."""

    decode: bool  # one token per request: `positions` has one entry per row
    rows: torch.Tensor  # [B] host: each request's row
    positions: torch.Tensor  # [T] host: each new token's position
    prefix_lens: list[int]
    extend_lens: list[int]
    slots: torch.Tensor  # [T] int32 host
    device_token_rows: torch.Tensor  # [T] device: each new token's request row
    device_positions: torch.Tensor  # [T] device
    device_slots: torch.Tensor  # [T] int32 device (from the step's packed copy)
    # (row, source row, length): req_to_token[row, :length] = req_to_token[source, :length] after the
    # writes, in order (a draft tree's lanes, speculative/draft_tree.py)
    lane_copies: tuple[tuple[int, int, int], ...] = ()


KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: auto is the model's dtype."""
    if choice == "auto":
        return model_dtype
    if choice not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {choice!r} is not one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[choice]


@dataclass(frozen=True)
class KVPoolUsage:
    total: int
    free: int
    in_use: int


class TokenToKVPool:
    """K/V buffers `[num_slots + 1, num_kv_heads, head_dim]` per layer and a free-slot allocator."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        k_scales: list[float] | None = None,
        v_scales: list[float] | None = None,
    ) -> None:
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (size + 1, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Per-layer dequantization scales of an FP8 pool (1.0 everywhere for a float one: never applied).
        self.k_scales = list(k_scales) if k_scales is not None else [1.0] * num_layers
        self.v_scales = list(v_scales) if v_scales is not None else [1.0] * num_layers
        if len(self.k_scales) != num_layers or len(self.v_scales) != num_layers:
            raise ValueError(f"KV scales for {len(self.k_scales)}/{len(self.v_scales)} layers, pool has {num_layers}")
        if self.dtype.itemsize > 1:
            self.k_scales, self.v_scales = [1.0] * num_layers, [1.0] * num_layers
        # Free list lives on the host: allocation sizes are decided by the scheduler anyway.
        self._free = torch.arange(1, size + 1, dtype=torch.int64)
        self._num_free = size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def available(self) -> int:
        return self._num_free

    def usage(self) -> KVPoolUsage:
        return KVPoolUsage(total=self.size, free=self._num_free, in_use=self.size - self._num_free)

    def alloc(self, n: int) -> torch.Tensor | None:
        """Return `n` free slot indices (int64, host), or None if the pool is short."""
        if n > self._num_free:
            return None
        start = self._num_free - n
        out = self._free[start : self._num_free].clone()
        self._num_free = start
        return out

    def free(self, slots: torch.Tensor) -> None:
        n = int(slots.numel())
        if n == 0:
            return
        if self._num_free + n > self.size:
            raise RuntimeError("KV pool double free")
        self._free[self._num_free : self._num_free + n] = slots.to("cpu", torch.int64)
        self._num_free += n

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Duplicate KV of `src` slots into `dst` slots in every layer (for n>1 sampling)."""
        for layer in range(self.num_layers):
            for buf in (self.k_buffer[layer], self.v_buffer[layer]):
                raw = buf.view(torch.uint8) if buf.dtype.itemsize == 1 else buf  # FP8 copies as bytes
                raw[dst] = raw[src]
