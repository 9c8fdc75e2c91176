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
    # Decode only: rows sharing a radix-tree prefix, attended once per group (runtime/cascade.py).
    cascade: CascadeLayout | None = None

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
