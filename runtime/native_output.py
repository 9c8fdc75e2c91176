"""SGLang's /generate result shape, rendered from a `SequenceResult`: what the native API sends
and what `Engine.generate` returns (`{"text", "output_ids", "meta_info"}`, logprobs as
`[logprob, token_id, text]` triples, `finish_reason` as `FinishReason.to_json()`)."""
from __future__ import annotations

from typing import Any

from radixlm.runtime.sequence_output import SequenceResult, TokenLogprob, TopLogprobs


def native_output(r: SequenceResult) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": r.finish.to_json() if r.finish is not None else None,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
    }
    if r.forced_tokens:
        meta["forced_tokens"] = r.forced_tokens
    if r.spec_verify_ct is not None:
        meta["spec_verify_ct"] = r.spec_verify_ct
        meta["spec_accepted_tokens"] = r.spec_accepted_tokens
    if r.finish is not None:
        meta["e2e_latency"] = r.e2e_latency
        if r.num_retractions:
            meta["num_retractions"] = r.num_retractions
    lp = r.logprobs
    if lp is not None:
        meta["input_token_logprobs"] = [_triple(e) for e in lp.input_tokens]
        meta["output_token_logprobs"] = [_triple(e) for e in lp.output_tokens]
        if lp.output_top is not None:
            meta["input_top_logprobs"] = [_top(e) for e in lp.input_top or []]
            meta["output_top_logprobs"] = [_top(e) for e in lp.output_top]
    return {"text": r.text, "output_ids": list(r.output_ids), "meta_info": meta}


def _triple(e: TokenLogprob) -> list[Any]:
    return [e.logprob, e.token_id, e.text]


def _top(entries: TopLogprobs | None) -> list[list[Any]] | None:
    return None if entries is None else [_triple(e) for e in entries]
