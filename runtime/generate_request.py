"""The native /generate request (SGLang's GenerateReqInput): parse, validate, split into items."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from radixlm.runtime.sampling_params import InvalidRequestError, SamplingParams

_TOP_LEVEL = {
    "text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "lora_path", "extra_key", "cache_salt",
    "image_data", "video_data", "audio_data", "input_embeds", "custom_logit_processor",
    "log_metrics", "priority", "session_params", "return_hidden_states", "modalities",
    "token_ids_logprob", "bootstrap_host", "bootstrap_port", "bootstrap_room", "data_parallel_rank",
    "no_logs", "background", "conversation_id",
}
_UNSUPPORTED = ("image_data", "video_data", "audio_data", "input_embeds", "custom_logit_processor",
                "lora_path", "session_params", "return_hidden_states", "token_ids_logprob")


@dataclass(frozen=True)
class GenerateItem:
    """One prompt of a (possibly batched) /generate call."""

    rid: str
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    return_logprob: bool
    logprob_start_len: int
    top_logprobs_num: int
    return_text_in_logprobs: bool
    extra_key: str | None


@dataclass(frozen=True)
class GenerateRequest:
    items: list[GenerateItem]
    is_batch: bool
    stream: bool


def _pick(value: Any, i: int, is_list: bool) -> Any:
    return value[i] if is_list and isinstance(value, list) else value


def parse_generate_request(body: Any, vocab_size: int | None = None) -> GenerateRequest:
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    for key in body:
        if key not in _TOP_LEVEL:
            raise InvalidRequestError(key, "unknown field")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, [], ""):
            raise InvalidRequestError(key, "is not supported by this server")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise InvalidRequestError("text", "exactly one of text and input_ids is required")
    if text is not None:
        if isinstance(text, str):
            prompts, is_batch = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, is_batch = list(text), True
        else:
            raise InvalidRequestError("text", "must be a string or a non-empty list of strings")
        ids_list: list[list[int] | None] = [None] * len(prompts)
        texts: list[str | None] = list(prompts)
    else:
        if isinstance(input_ids, list) and input_ids and all(isinstance(t, list) for t in input_ids):
            ids_list, is_batch = [list(x) for x in input_ids], True
        elif isinstance(input_ids, list) and input_ids:
            ids_list, is_batch = [list(input_ids)], False
        else:
            raise InvalidRequestError("input_ids", "must be a non-empty list of token ids or a list of such lists")
        for ids in ids_list:
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("input_ids", "each prompt must be a non-empty list of integers")
            if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
                raise InvalidRequestError("input_ids", f"token ids must be in [0, {vocab_size})")
        texts = [None] * len(ids_list)
    n = len(texts)
    sp = body.get("sampling_params")
    if isinstance(sp, list) and (not is_batch or len(sp) != n):
        raise InvalidRequestError("sampling_params", f"a list of sampling_params must have one entry per prompt ({n})")
    if sp is not None and not isinstance(sp, (dict, list)):
        raise InvalidRequestError("sampling_params", "must be an object or a list of objects")
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, (str, list)):
        raise InvalidRequestError("rid", "must be a string or a list of strings")
    if isinstance(rid, list) and len(rid) != n:
        raise InvalidRequestError("rid", f"a list of rids must have one entry per prompt ({n})")
    extra_key = body.get("extra_key") or body.get("cache_salt")
    items = []
    for i in range(n):
        params = SamplingParams.from_dict(_pick(sp, i, True), vocab_size)
        r = _pick(rid, i, True)
        if r is None:
            r = uuid.uuid4().hex
        elif is_batch and isinstance(rid, str):
            r = f"{rid}_{i}"
        start = _pick(body.get("logprob_start_len"), i, True)
        start = -1 if start is None else start
        top = _pick(body.get("top_logprobs_num"), i, True) or 0
        if not isinstance(start, int) or start < -1:
            raise InvalidRequestError("logprob_start_len", "must be an integer >= -1")
        if not isinstance(top, int) or not 0 <= top <= 100:
            raise InvalidRequestError("top_logprobs_num", "must be an integer in [0, 100]")
        items.append(GenerateItem(
            rid=str(r), text=texts[i], input_ids=ids_list[i], params=params,
            return_logprob=bool(_pick(body.get("return_logprob"), i, True) or False),
            logprob_start_len=start, top_logprobs_num=top,
            return_text_in_logprobs=bool(body.get("return_text_in_logprobs") or False),
            extra_key=_pick(extra_key, i, True),
        ))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream", "must be a boolean")
    return GenerateRequest(items=items, is_batch=is_batch, stream=stream)
