"""The tensors one forward pass needs, built by the scheduler and consumed by the model runner."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixlm.kernels.cascade_layout import CascadeLayout


class ForwardMode(Enum):
    EXTEND = "extend"  # prefill (possibly one chunk, possibly on top of a cached prefix)
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [T] int64, device
    positions: torch.Tensor  # [T] int64, device
    out_cache_loc: torch.Tensor  # [T] int64 KV slots for the new tokens, device
    req_pool_indices: torch.Tensor  # [B] int64, device
    seq_lens: torch.Tensor  # [B] int32 KV length incl. new tokens, device
    # Host copies: the torch backend loops over requests; the scheduler built them anyway.
    req_pool_indices_cpu: list[int]
    seq_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]  # new tokens per request (1 each in decode)
    extend_seq_lens: torch.Tensor  # [B] int32, device
    extend_start_loc: torch.Tensor  # [B] int32 offset of each request's first new token in T
    # Rows of the hidden states whose logits are needed, e.g. each request's last token,
    # or every position from logprob_start_len for input logprobs.
    logits_indices: torch.Tensor  # [N] int64, device
    # Per request: the LoRA adapter it runs with (None: the base model); None when no request has one.
    lora_names: list[str | None] | None = None
    # Adapters of requests in flight that this batch leaves out (a prefill without the decode rows): their
    # device slots are not taken for this batch's swaps (the next decode step needs them).
    lora_keep: frozenset[str] = frozenset()
    # Decode only: rows sharing a radix-tree prefix, attended once per group (runtime/cascade.py).
    cascade: CascadeLayout | None = None
    # Extend only: draft trees verified in a mixed batch (speculative/draft_tree.py): per request the
    # offset of its [ext, ext] ancestor matrix in tree_mask (-1: causal), on the device, and the
    # matrices on the host (the torch reference); None when no request carries a tree.
    tree_start: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    tree_masks_cpu: tuple[torch.Tensor | None, ...] | None = None

    @classmethod
    def for_rows(cls, mode: ForwardMode, input_ids: list[int] | torch.Tensor, positions: list[int],
                 slots: torch.Tensor, rows: list[int], seq_lens: list[int], chunk_lens: list[int],
                 device: torch.device) -> "ForwardBatch":
        """A batch built outside the scheduler (draft models): row i appends chunk_lens[i] tokens
        whose KV ends at seq_lens[i]; logits at each row's last token."""
        starts, ends, offset = [], [], 0
        for n in chunk_lens:
            starts.append(offset)
            offset += n
            ends.append(offset - 1)

        def t(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        ids = input_ids.to(device) if isinstance(input_ids, torch.Tensor) else t(input_ids)
        return cls(mode=mode, input_ids=ids, positions=t(positions), out_cache_loc=slots.to(device),
                   req_pool_indices=t(rows), seq_lens=t(seq_lens, torch.int32), req_pool_indices_cpu=rows,
                   seq_lens_cpu=seq_lens, extend_seq_lens_cpu=chunk_lens, extend_seq_lens=t(chunk_lens, torch.int32),
                   extend_start_loc=t(starts, torch.int32), logits_indices=t(ends))

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu)

    @property
    def max_extend_len(self) -> int:
        return max(self.extend_seq_lens_cpu)
