"""The native /generate request (SGLang's GenerateReqInput): parse, validate, split into items.

Every field is checked and a failure names it (`input_ids[1][3]`, `logprob_start_len[2]`,
`sampling_params[0].top_p`). Per-prompt fields take one value for all prompts or, for a batch
only, a list with one entry per prompt. Unknown fields are ignored with a log warning."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from radixlm.runtime.field_checks import check_encodable, field_path, ignore_unknown, is_int, require_bool, require_int, require_str
from radixlm.runtime.sampling_params import InvalidRequestError, SamplingParams

# Accepted, checked for type, without effect here (SGLang's scheduling / disaggregation knobs).
_NO_EFFECT: dict[str, tuple[type, ...]] = {
    "log_metrics": (bool,), "priority": (int,), "bootstrap_host": (str, list), "bootstrap_port": (int, list),
    "bootstrap_room": (int, list), "data_parallel_rank": (int,), "no_logs": (bool,), "background": (bool,),
    "conversation_id": (str,), "modalities": (list,),
}
# Known, and refused when set: this server cannot honour them.
_UNSUPPORTED = ("image_data", "video_data", "audio_data", "input_embeds", "custom_logit_processor",
                "session_params", "return_hidden_states", "token_ids_logprob")
# Read per prompt: one value, or (batch only) a list with an entry per prompt.
_PER_PROMPT = ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "extra_key",
               "cache_salt", "lora_path")
KNOWN_FIELDS = frozenset({"text", "input_ids", "stream", "return_text_in_logprobs", *_PER_PROMPT, *_NO_EFFECT,
                          *_UNSUPPORTED})


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
    lora_path: str | None = None  # the LoRA adapter's name (None: the base model); checked by the TokenizerManager
    lora_field: str = "lora_path"  # where it came from, for errors: lora_path, lora_path[2]
    rid_field: str = "rid"  # where the rid came from, for errors: rid, rid[1]
    prompt_field: str = "text"  # where the prompt came from, for errors: text, text[1], input_ids[0], ...
    # max_new_tokens was given (else the default, which the scheduler trims to what the context leaves)
    max_new_tokens_given: bool = True
    params_field: str = "sampling_params"  # where the sampling fields came from: sampling_params[1]; "" (OpenAI): top level
    constraint_field: str | None = None  # where the constraint came from, if not `params_field` (response_format)

    def error_field(self, name: str) -> str:
        """The request field an error about `name` (a sampling field, or lora_path) names, as the client sent it."""
        if name == "lora_path":
            return self.lora_field
        if name in ("regex", "json_schema", "ebnf") and self.constraint_field:
            return self.constraint_field
        return f"{self.params_field}.{name}" if self.params_field else name


@dataclass(frozen=True)
class GenerateRequest:
    items: list[GenerateItem]
    is_batch: bool
    stream: bool


def _per_prompt(value: Any, name: str, n: int, is_batch: bool) -> list[tuple[Any, str]]:
    """(value, field path) for each prompt."""
    if isinstance(value, list):
        if not is_batch:
            raise InvalidRequestError(name, "a list is only allowed with a batch of prompts; give one value")
        if len(value) != n:
            raise InvalidRequestError(name, f"must have one entry per prompt ({n}), got {len(value)}")
        return [(v, field_path(name, i)) for i, v in enumerate(value)]
    return [(value, name)] * n


def _params_key(sp: dict[str, Any] | None) -> tuple | None:
    """A batch's sampling_params entry as a key: equal entries (one dict given for every prompt, or
    copies of it: ~90 µs each to check on a CPU, 512 of them in a batch) are parsed once — the result
    is frozen. Values typed into the key (True is not 1); None (parse it) for nested values."""
    if sp is None:
        return ()
    key = []
    for name, value in sp.items():
        if isinstance(value, list | tuple):
            if not all(v is None or isinstance(v, _SCALARS) for v in value):
                return None
            value = tuple((type(v), v) for v in value)
        elif value is not None and not isinstance(value, _SCALARS):
            return None
        key.append((name, type(value), value))
    return tuple(sorted(key, key=lambda kv: kv[0]))


_SCALARS = (str, int, float, bool)


def _plain_ids_in_range(ids: list[Any], vocab_size: int | None) -> bool:
    """Every id a plain int inside the vocabulary, checked at C speed (a 512 x 1,088-token batch took
    0.7-1.2 s of the Engine's time id by id on a CPU); False sends the caller to the per-id checks, which
    name the first bad one."""
    if not ids or set(map(type, ids)) != {int}:
        return False
    return vocab_size is None or (min(ids) >= 0 and max(ids) < vocab_size)


def _prompts(text: Any, input_ids: Any, vocab_size: int | None,
             context_len: int | None) -> tuple[list[str | None], list[list[int] | None], bool]:
    if text is not None and input_ids is not None:
        raise InvalidRequestError("input_ids", "give text or input_ids, not both")
    if text is None and input_ids is None:
        raise InvalidRequestError("text", "exactly one of text and input_ids is required")
    if text is not None:
        if isinstance(text, str):
            return [text], [None], False
        if isinstance(text, list) and text:
            for i, t in enumerate(text):
                require_str(t, field_path("text", i))
            return list(text), [None] * len(text), True
        raise InvalidRequestError("text", "must be a string or a non-empty list of strings")
    if not isinstance(input_ids, list):
        raise InvalidRequestError("input_ids", "must be a list of token ids or a list of such lists")
    is_batch = bool(input_ids) and all(isinstance(t, list) for t in input_ids)
    rows = input_ids if is_batch else [input_ids]
    for i, ids in enumerate(rows):  # (an over-context prompt is refused before its ids are copied or walked)
        if context_len is not None and len(ids) >= context_len:
            where = field_path("input_ids", i) if is_batch else "input_ids"
            raise InvalidRequestError(where, f"the prompt has {len(ids)} tokens; this model's context is {context_len}")
    ids_list = [list(x) for x in rows]
    for i, ids in enumerate(ids_list):
        where = field_path("input_ids", i) if is_batch else "input_ids"
        if _plain_ids_in_range(ids, vocab_size):
            continue
        for j, t in enumerate(ids):  # (the prompt is named, the position said: `input_ids: ...`)
            if not is_int(t):
                raise InvalidRequestError(where, f"[{j}] must be an integer token id, got {type(t).__name__}")
            if vocab_size is not None and not 0 <= t < vocab_size:
                raise InvalidRequestError(where, f"token id {t} at [{j}] is outside the vocabulary [0, {vocab_size})")
    return [None] * len(ids_list), ids_list, is_batch


def parse_generate_request(body: Any, vocab_size: int | None = None, context_len: int | None = None,
                           strings_checked: bool = False) -> GenerateRequest:
    """A /generate JSON body: its fields are the keyword arguments of `build_generate_request`. `strings_checked`:
    the caller looked for lone surrogates in the whole body already (the server's request_body.parse_body)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    if not strings_checked:
        check_encodable(body)  # the whole body, unknown fields too
    return build_generate_request(vocab_size, False, context_len, **body)


def build_generate_request(
    vocab_size: int | None, check_strings: bool = True, context_len: int | None = None, /, *,
    text: Any = None,
    input_ids: Any = None,
    sampling_params: Any = None,
    rid: Any = None,
    return_logprob: Any = None,
    logprob_start_len: Any = None,
    top_logprobs_num: Any = None,
    return_text_in_logprobs: Any = None,
    extra_key: Any = None,
    cache_salt: Any = None,
    lora_path: Any = None,
    stream: Any = False,
    **other: Any,
) -> GenerateRequest:
    """The one request builder of /generate and `Engine.generate`: every field checked, as sent in
    JSON or given in Python (`other`: the no-effect and refused fields; anything else is ignored
    with a warning). `check_strings` False: the caller has already looked for lone surrogates. `context_len`: an
    `input_ids` prompt that long is refused before its ids are checked (a million of them took ~0.1 s)."""
    fields = {"text": text, "input_ids": input_ids, "sampling_params": sampling_params, "rid": rid,
              "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
              "top_logprobs_num": top_logprobs_num, "extra_key": extra_key, "cache_salt": cache_salt,
              "lora_path": lora_path}
    if check_strings:
        check_encodable({**fields, **other})
    ignore_unknown("", other, KNOWN_FIELDS)
    for key in _UNSUPPORTED:
        if other.get(key) not in (None, [], ""):
            raise InvalidRequestError(key, "is not supported by this server")
    for key, types in _NO_EFFECT.items():
        value = other.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise InvalidRequestError(key, f"must be of type {' or '.join(t.__name__ for t in types)}")
    texts, ids_list, is_batch = _prompts(text, input_ids, vocab_size, context_len)
    n = len(texts)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream", "must be a boolean")
    if return_text_in_logprobs is not None:
        require_bool(return_text_in_logprobs, "return_text_in_logprobs")
    per = {name: _per_prompt(fields[name], name, n, is_batch) for name in _PER_PROMPT}
    items = []
    parsed: dict[tuple, SamplingParams] = {}
    for i in range(n):
        sp, sp_name = per["sampling_params"][i]
        if sp is not None and not isinstance(sp, dict):
            raise InvalidRequestError(sp_name, "must be an object")
        key = _params_key(sp)
        params = parsed.get(key) if key is not None else None
        if params is None:
            params = SamplingParams.from_dict(sp, vocab_size, prefix=sp_name)
            if key is not None:
                parsed[key] = params
        r, r_name = per["rid"][i]
        if r is None:
            r = uuid.uuid4().hex
        else:
            r = require_str(r, r_name)
            if not r:
                raise InvalidRequestError(r_name, "must be a non-empty string")
            if is_batch and isinstance(rid, str):
                r = f"{r}_{i}"
        lp, lp_name = per["return_logprob"][i]
        start, start_name = per["logprob_start_len"][i]
        top, top_name = per["top_logprobs_num"][i]
        key, key_name = per["extra_key"][i] if per["extra_key"][i][0] is not None else per["cache_salt"][i]
        lora, lora_name = per["lora_path"][i]
        items.append(GenerateItem(
            rid=r, text=texts[i], input_ids=ids_list[i], params=params,
            return_logprob=False if lp is None else require_bool(lp, lp_name),
            logprob_start_len=-1 if start is None else require_int(start, start_name, -1),
            top_logprobs_num=0 if top is None else require_int(top, top_name, 0, 100),
            return_text_in_logprobs=bool(return_text_in_logprobs),
            extra_key=None if key in (None, "") else require_str(key, key_name),
            lora_path=None if lora in (None, "") else require_str(lora, lora_name), lora_field=lora_name, rid_field=r_name,
            prompt_field=field_path("text" if texts[i] is not None else "input_ids", i) if is_batch else
            ("text" if texts[i] is not None else "input_ids"),
            max_new_tokens_given=isinstance(sp, dict) and sp.get("max_new_tokens") is not None,
            params_field=sp_name,
        ))
    return GenerateRequest(items=items, is_batch=is_batch, stream=stream)
