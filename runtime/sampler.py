"""Batched sampling on the device: penalties, bias, masks, temperature, top-k/top-p/min-p, seeded draws.

Every draw is a deterministic function of (request seed, decode step, token id), so a request samples
the same tokens alone or inside any batch, and `seed` reproduces a completion exactly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from radixlm.runtime.device_transfer import to_device
from radixlm.runtime.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF


class SampleRow(NamedTuple):
    """What the sampler needs to know about one request at this step (immutable; made per row per
    step, so a NamedTuple rather than a frozen dataclass, whose __init__ costs ~5x as much)."""

    params: SamplingParams
    seed: int
    step: int  # number of tokens this request has already generated
    output_ids: list[int]
    prompt_ids: list[int]
    banned_ids: tuple[int, ...] = ()  # e.g. EOS while below min_new_tokens
    prompt_mask: torch.Tensor | None = None  # [vocab] bool, the prompt's tokens (Req.prompt_mask); None: from prompt_ids


@dataclass
class SamplingBatch:
    """Per-row sampling values on the device. Only what the batch's draw reads is converted there (a
    kernel launch each): nothing for an all-greedy batch, top-k / top-p / min-p only where a row uses
    them, the greedy flags only beside sampled rows."""

    temperatures: torch.Tensor | None  # [B, 1] float (None: all greedy)
    top_ps: torch.Tensor | None  # [B] (None: no row filters by top-p)
    top_ks: torch.Tensor | None  # [B] int64, vocab size when disabled (None: no row filters at all)
    min_ps: torch.Tensor | None  # [B] (None: no row filters by min-p)
    row_hashes: torch.Tensor | None  # [B] int64: each row's hash of (seed, step), made on the host
    greedy: torch.Tensor | None  # [B] bool (None: all greedy, or none)
    all_greedy: bool
    any_greedy: bool
    need_top_k: bool
    need_top_p: bool
    need_min_p: bool
    rows: list[SampleRow]

    @classmethod
    def build(cls, rows: list[SampleRow], vocab_size: int, device: torch.device) -> "SamplingBatch":
        """One pass over the rows and one host-to-device copy: every per-row value is exact in
        float64 (seeds and their hashes are 32-bit, steps and top-k far below 2**53). The rows' hash of
        (seed, step) is computed here with numpy, not by some twenty small kernels on the device."""
        table = []
        all_greedy, any_greedy, need_top_k, need_top_p, need_min_p = True, False, False, False, False
        for r in rows:
            p = r.params
            top_k = vocab_size if p.top_k < 0 else min(p.top_k, vocab_size)
            greedy = p.is_greedy
            any_greedy = any_greedy or greedy
            if not greedy:
                all_greedy = False
                need_top_k = need_top_k or top_k < vocab_size
                need_top_p = need_top_p or p.top_p < 1.0
                need_min_p = need_min_p or p.min_p > 0.0
            table.append((max(p.temperature, 1e-6), p.top_p, top_k, p.min_p, r.seed & _MASK32, r.step, greedy))
        if all_greedy:  # the draw is the logits' argmax: nothing to send
            return cls(None, None, None, None, None, None, True, any_greedy, False, False, False, rows)
        values = np.array(table, dtype=np.float64).reshape(len(rows), 7)
        values[:, 4] = _row_hash(values[:, 4].astype(np.int64), values[:, 5].astype(np.int64))
        cols = to_device(torch.from_numpy(values), device).t()
        filters = need_top_k or need_top_p or need_min_p
        return cls(
            temperatures=cols[0].float()[:, None],
            top_ps=cols[1].float() if need_top_p else None,
            top_ks=cols[2].long() if filters else None,
            min_ps=cols[3].float() if need_min_p else None,
            row_hashes=cols[4].long(),
            greedy=cols[6].bool() if any_greedy else None,
            all_greedy=False,
            any_greedy=any_greedy,
            need_top_k=need_top_k,
            need_top_p=need_top_p,
            need_min_p=need_min_p,
            rows=rows,
        )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors (values stay below 2**63, so no overflow)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


_TOKEN_MIX: dict[tuple[int, torch.device], torch.Tensor] = {}


def _token_mix(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64: each token id's hash, the same at every step: made once per vocabulary and device
    (nine kernel launches a sampled step fewer: the host launches every draw's kernels)."""
    key = (vocab_size, device)
    mix = _TOKEN_MIX.get(key)
    if mix is None:
        token = torch.arange(vocab_size, device=device, dtype=torch.int64)
        mix = _TOKEN_MIX[key] = _mix32(token * 0x27D4EB2F & _MASK32)
    return mix


def _row_hash(seeds: Any, steps: Any) -> Any:
    """Each row's hash of (seed, step): int64 tensors or numpy arrays (the same values either way)."""
    return _mix32(seeds ^ _mix32((steps * 0x9E3779B9 + 0x7F4A7C15) & _MASK32))


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float64 uniforms in (0, 1), a pure function of (seed, step, token id).

    float64: in float32 the largest draws round to exactly 1.0, whose -log is 0, and 0/0 = NaN
    would win the argmax for a masked token."""
    return _uniform_of_rows(_row_hash(seeds, steps), vocab_size)


def _uniform_of_rows(row_hashes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`seeded_uniform` from the rows' hashes of (seed, step)."""
    bits = _mix32(row_hashes[:, None] ^ _token_mix(vocab_size, row_hashes.device)[None, :])
    return (bits.double() + 0.5).div_(2.0**32)


def apply_logit_adjustments(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Penalties, logit_bias and banned tokens, in place on a float32 copy; rows with none are untouched."""
    device = logits.device
    vocab = logits.shape[1]
    for i, row in enumerate(batch.rows):
        p = row.params
        if p.has_penalties:
            out_ids = torch.tensor(row.output_ids, dtype=torch.int64, device=device)
            if p.repetition_penalty != 1.0 and row.prompt_mask is not None:
                seen = row.prompt_mask.clone()  # O(vocab + output) a step, whatever the prompt's length
                seen[out_ids] = True
                vals = logits[i]
                logits[i] = torch.where(seen, torch.where(vals > 0, vals / p.repetition_penalty,
                                                          vals * p.repetition_penalty), vals)
            elif p.repetition_penalty != 1.0:
                seen = torch.tensor(row.prompt_ids + row.output_ids, dtype=torch.int64, device=device).unique()
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if out_ids.numel() and (p.frequency_penalty or p.presence_penalty):
                counts = torch.zeros(vocab, device=device).index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            ids, biases = p.logit_bias_tensors(device)
            logits[i, ids] += biases
        if row.banned_ids:
            logits[i, list(row.banned_ids)] = float("-inf")
    return logits


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), index for index; at <= kernels.argmax.MAX_ROWS rows on a CUDA device with Triton,
    its two-stage kernel (128k logits at 1..16 rows: 16-17 vs 32-34 µs on the H200, benchmarks/RESULTS.md)."""
    if logits.is_cuda and logits.dim() == 2 and 0 < logits.shape[0] <= _argmax_rows():
        from radixlm.kernels.argmax import argmax_two_stage

        return argmax_two_stage(logits)
    return logits.argmax(dim=-1)


@functools.cache
def _argmax_rows() -> int:
    """Rows the two-stage argmax takes here: 0 where Triton cannot run (a CPU-only install)."""
    from radixlm.kernels import triton_available

    if not triton_available():
        return 0
    from radixlm.kernels.argmax import MAX_ROWS

    return MAX_ROWS


def sample(logits: torch.Tensor, batch: SamplingBatch, vocab_mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (already adjusted) -> next token ids [B] int64. `vocab_mask`: bool [B, V], True = banned."""
    if vocab_mask is not None:
        logits = logits.masked_fill(vocab_mask, float("-inf"))
    if batch.all_greedy:
        return greedy_argmax(logits)
    assert batch.row_hashes is not None and batch.temperatures is not None
    probs = torch.softmax(logits / batch.temperatures, dim=-1)
    if batch.need_top_k or batch.need_top_p or batch.need_min_p:
        probs = _filter_probs(probs, batch)
    exp_draws = (-torch.log(_uniform_of_rows(batch.row_hashes, probs.shape[1]))).float()
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws token i with probability p_i
    # (E_i >= 1.2e-10 > 0, so a zero-probability token scores exactly 0 and is never drawn).
    sampled = (probs / exp_draws).argmax(dim=-1)
    if not batch.any_greedy:
        return sampled  # (no argmax of the logits nor a select for rows that have none)
    assert batch.greedy is not None
    return torch.where(batch.greedy, greedy_argmax(logits), sampled)


def _filter_probs(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    vocab = probs.shape[1]
    ranks = torch.arange(vocab, device=probs.device)[None, :]
    assert batch.top_ks is not None
    keep = ranks < batch.top_ks[:, None]
    if batch.need_top_p:
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        assert batch.top_ps is not None
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= mass_before < batch.top_ps[:, None]
    if batch.need_min_p:
        assert batch.min_ps is not None
        keep &= sorted_probs >= batch.min_ps[:, None] * sorted_probs[:, :1]
    keep[:, 0] = True
    filtered = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    return filtered


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities under the model's own distribution (before sampling adjustments).

    Returns (logprob of token_ids [N], top-k values [N, k] or None, top-k ids [N, k] or None).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    if top_k <= 0:
        return chosen, None, None
    vals, ids = logprobs.topk(min(top_k, logprobs.shape[1]), dim=-1)
    return chosen, vals, ids
