"""Packed token bitmasks (bit set = token allowed) and applying them to logits.

One int32 word holds 32 tokens, so a batch mask is ~6 KB per request for a 50k vocabulary:
cheap to fill on the CPU and to ship to the accelerator next to the logits.
"""

from __future__ import annotations

import importlib.util

import torch

_SHIFTS: dict[torch.device, torch.Tensor] = {}
_TRITON: bool | None = None


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_token_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """[batch, ceil(vocab/32)] int32, all bits set: rows of unconstrained requests pass through."""
    return torch.full((batch, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def ids_to_row(ids: list[int] | range, width: int) -> torch.Tensor:
    """A packed row from a list of allowed ids (reference path and small masks)."""
    words = [0] * width
    for tid in ids:
        words[tid >> 5] |= 1 << (tid & 31)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def row_to_ids(row: torch.Tensor) -> list[int]:
    """Inverse of ids_to_row: the allowed ids of a packed row, ascending."""
    bits = (row.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return torch.nonzero(bits.reshape(-1)).flatten().tolist()


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    return shifts


def _has_triton() -> bool:
    global _TRITON
    if _TRITON is None:
        _TRITON = importlib.util.find_spec("triton") is not None
    return _TRITON


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits of disallowed tokens to -inf, in place, for the whole batch at once (on a GPU
    with Triton: one launch, kernels/token_bitmask.py; elsewhere this torch reference).

    logits [B, V] float (any device), bitmask [B, W] int32 (CPU or same device). Logits beyond
    32*W columns (a model vocabulary padded past the tokenizer's) become -inf too.
    """
    if logits.dim() != 2 or bitmask.dim() != 2:
        raise ValueError(f"expected 2-D logits and bitmask, got {tuple(logits.shape)} and {tuple(bitmask.shape)}")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be int32, got {bitmask.dtype}")
    if logits.shape[0] != bitmask.shape[0]:
        raise ValueError(f"batch mismatch: logits {logits.shape[0]} rows, bitmask {bitmask.shape[0]}")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.is_cuda and logits.stride(1) == 1 and bitmask.is_contiguous() and _has_triton():
        from radixlm.kernels.token_bitmask import apply_token_bitmask_triton

        apply_token_bitmask_triton(logits, bitmask)  # one launch (the decode step's hot path)
        return
    batch, vocab = logits.shape
    covered = min(vocab, 32 * bitmask.shape[1])
    bits = (bitmask.unsqueeze(-1) >> _shifts(logits.device)) & 1
    allowed = bits.reshape(batch, -1)[:, :covered].bool()
    logits[:, :covered].masked_fill_(~allowed, float("-inf"))
    if covered < vocab:
        logits[:, covered:] = float("-inf")
