"""A request's life inside the scheduler: tokens, KV ownership, logprobs, finish state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radixlm.runtime.io_struct import FinishReason, ReqOutput, TokenizedGenerateReq, sequence_rids
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.top_rows import TopRows


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    extra_key: str | None = None
    group_rid: str | None = None  # the client's rid when n > 1 splits it into "<rid>-<i>"
    lora_name: str | None = None  # LoRA adapter (None: the base model)
    lora_uid: str | None = None  # that adapter's load generation, set by the scheduler: part of the cache key
    lora_arrival: int = 0  # the n-th request of its adapter to arrive (bounds longest-first admission, lora/admission.py)
    output_ids: list[int] = field(default_factory=list)

    # KV state: req_to_token[req_pool_idx, :kv_len] are this request's slots; the first
    # `cache_protected_len` belong to the prefix cache (locked through `last_node`).
    req_pool_idx: int | None = None
    kv_len: int = 0
    cache_protected_len: int = 0
    last_node: Any = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    admitted_once: bool = False
    num_retractions: int = 0

    # Overlap scheduling: tokens sampled on the device but not yet appended to output_ids, and
    # this request's row in the uncommitted step that sampled them (its next input token lives there).
    tokens_on_device: int = 0
    uncommitted_row: int = 0

    # n > 1: followers sample from the leader's prefill and share its prompt KV.
    followers: list["Req"] = field(default_factory=list)

    # Grammar-constrained decoding (radixlm.constrained Matcher), set when compiled.
    grammar: Any = None
    grammar_pending: bool = False
    forced_tokens: int = 0

    # Speculative decoding (set when the scheduler speculates): verify steps taken, drafts accepted.
    speculative: bool = False
    spec_verify_ct: int = 0
    spec_accepted_tokens: int = 0

    finished_reason: FinishReason | None = None
    # (vocab size, device) -> the prompt's token mask; one dict for a request's n sequences (same prompt)
    prompt_masks: dict[tuple[int, str], Any] = field(default_factory=dict, repr=False)
    # Logprobs not yet sent to the front process.
    input_logprobs_done: bool = False
    pending_input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    pending_input_top: list[list[tuple[float, int]] | TopRows | None] = field(default_factory=list)
    pending_output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    pending_output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    sent_output_len: int = 0

    @classmethod
    def from_wire(cls, msg: TokenizedGenerateReq, seed: int) -> "Req":
        return cls(
            rid=msg.rid, input_ids=list(msg.input_ids), params=msg.params, seed=seed,
            return_logprob=msg.return_logprob, logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num, stream=msg.stream, extra_key=msg.extra_key,
            lora_name=msg.lora_path,
        )

    @classmethod
    def group_from_wire(cls, msg: TokenizedGenerateReq, seeds: list[int]) -> "Req":
        """The request's first sequence; with n > 1 the others are its followers (one seed each)."""
        rids = sequence_rids(msg.rid, len(seeds))
        seqs = [cls.from_wire(msg, seed) for seed in seeds]
        for seq, rid in zip(seqs, rids):
            seq.rid = rid
            seq.group_rid = msg.rid if len(seqs) > 1 else None
        seqs[0].followers = seqs[1:]
        for seq in seqs[1:]:
            seq.prompt_masks = seqs[0].prompt_masks  # n=128 over a 30k-token prompt: one mask, not 128
        return seqs[0]

    def prompt_mask(self, vocab_size: int, device: Any) -> Any:
        """The prompt's tokens as a [vocab] bool tensor, made once: the repetition penalty reads them at
        every step (re-sent from the prompt's list: 3.7 ms a row a step at 30k prompt tokens on the 2-core
        VM, where a pass over a 49k vocabulary costs 0.34 ms). None without a repetition penalty, and for
        prompts under vocab / 16 tokens, whose ids cost less than that pass."""
        if self.params.repetition_penalty == 1.0 or len(self.input_ids) < vocab_size // 16:
            return None
        key = (vocab_size, str(device))
        mask = self.prompt_masks.get(key)
        if mask is None:
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[torch.tensor(self.input_ids, dtype=torch.int64, device=device)] = True
            self.prompt_masks[key] = mask
        return mask

    def take_output(self) -> ReqOutput:
        """What the front has not seen yet (tokens, logprobs), as one delta; marks it sent."""
        new_ids = self.output_ids[self.sent_output_len :]
        self.sent_output_len = len(self.output_ids)
        out = ReqOutput(
            rid=self.rid, output_ids=new_ids, finished_reason=self.finished_reason,
            prompt_tokens=len(self.input_ids), cached_tokens=self.cached_tokens,
            completion_tokens=len(self.output_ids), forced_tokens=self.forced_tokens,
            num_retractions=self.num_retractions,
        )
        if self.speculative:
            out.spec_verify_ct, out.spec_accepted_tokens = self.spec_verify_ct, self.spec_accepted_tokens
        if self.return_logprob:
            if self.pending_input_logprobs or self.input_logprobs_done:
                out.input_token_logprobs, self.pending_input_logprobs = self.pending_input_logprobs, []
                out.input_top_logprobs, self.pending_input_top = self.pending_input_top, []
            out.output_token_logprobs, self.pending_output_logprobs = self.pending_output_logprobs, []
            out.output_top_logprobs, self.pending_output_top = self.pending_output_top, []
        return out

    @property
    def fill_ids(self) -> list[int]:
        """Every token whose KV must exist before the next decode: prompt + generated."""
        return self.input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def fill_slice(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end] without building the whole list (hot path: every step)."""
        n_in = len(self.input_ids)
        if end <= n_in:
            return self.input_ids[start:end]
        if start >= n_in:
            return self.output_ids[start - n_in : end - n_in]
        return self.input_ids[start:] + self.output_ids[: end - n_in]

    @property
    def cache_namespace(self) -> str | None:
        """The prefix-cache namespace: KV computed under one adapter (or the base model, or another
        cache salt) is never reused under another."""
        if self.lora_uid is None:
            return self.extra_key
        return f"lora:{self.lora_uid}" + ("" if self.extra_key is None else f"\x00{self.extra_key}")

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids) + self.tokens_on_device

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_done

    def input_logprob_range(self, prefix: int, end: int) -> tuple[int, int]:
        """Prompt positions [lo, hi) of a chunk [prefix, end) whose logits give input logprobs: row p
        predicts prompt token p + 1, and positions >= logprob_start_len get an entry (empty: hi <= lo)."""
        return max(self.logprob_start_len - 1, prefix), min(end, len(self.input_ids) - 1)

    @property
    def max_prefix_len(self) -> int:
        """How much of fill_ids may come from the cache: the last token is always computed (its
        logits pick the next token), and input logprobs need logits from logprob_start_len - 1 on."""
        cap = self.fill_len - 1
        if self.wants_input_logprobs:
            cap = min(cap, max(self.logprob_start_len - 1, 0))
        return max(cap, 0)

    def remaining_new_tokens(self) -> int:
        return max(self.params.max_new_tokens - len(self.output_ids) - self.tokens_on_device, 0)
