"""Per-request sampling parameters: parsed from the wire dict and validated, naming the bad field."""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

from radixlm.runtime.stop_regex import validate_all as validate_stop_regexes

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-6
# The scheduler checks these at every step of the request, on its thread (a 64-MB body could carry a
# million stop strings or token ids: ms a row a step, x128 for n=128).
MAX_STOP_STRINGS = 256
MAX_STOP_CHARS = 8192  # all stop strings together (the tail decoded each step is the longest one's length)
MAX_STOP_TOKEN_IDS = 4096  # distinct ones


class InvalidRequestError(ValueError):
    """A client error: becomes an HTTP 400 naming `field`."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_regex: tuple[str, ...] = ()  # runtime/stop_regex.py
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @functools.cached_property
    def has_penalties(self) -> bool:  # cached: read for every running request each step
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0

    @functools.cached_property
    def needs_output_history(self) -> bool:
        """Sampling reads the tokens generated so far (so it cannot run ahead on the device)."""
        return self.has_penalties or bool(self.logit_bias)

    def logit_bias_tensors(self, device: Any) -> tuple[Any, Any]:
        """logit_bias as (token ids, biases) tensors on `device`, made once: the sampler adds them at every
        step, and a whole-vocabulary bias rebuilt from its tuples took ~32 ms a row a step (49k tokens)."""
        import torch

        key = str(device)
        cache = self.__dict__.setdefault("_bias_tensors", {})  # frozen: not a field, never compared or replaced
        if key not in cache:
            cache[key] = (torch.tensor([tid for tid, _ in self.logit_bias], dtype=torch.int64, device=device),
                          torch.tensor([b for _, b in self.logit_bias], dtype=torch.float32, device=device))
        return cache[key]

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:  # looked up at every step of the request
        return frozenset(self.stop_token_ids)

    @property
    def constraint(self) -> tuple[str, str] | None:
        for kind in ("regex", "json_schema", "ebnf"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        return None

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, vocab_size: int | None = None,
                  prefix: str = "sampling_params") -> "SamplingParams":
        """Unknown keys are ignored with a log warning; every known one is type- and range-checked."""
        from radixlm.runtime.field_checks import ignore_unknown

        raw = dict(raw or {})
        # Accepted for SGLang compatibility, no effect here.
        for ignored in ("stream_interval", "custom_params"):
            raw.pop(ignored, None)
        if "sampling_seed" in raw and "seed" not in raw:
            raw["seed"] = raw.pop("sampling_seed")
        if raw.get("structural_tag") is not None:
            raise InvalidRequestError(f"{prefix}.structural_tag", "structural tags are not supported; use json_schema, regex or ebnf")
        raw.pop("structural_tag", None)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in ignore_unknown(prefix, raw, known):
            del raw[key]
        values: dict[str, Any] = {}
        defaults = cls()
        for key, value in raw.items():
            if value is None:
                continue  # None means "default", as SGLang's frontend sends nulls
            values[key] = value
        p = _coerce(values, defaults, prefix)
        p._validate(prefix, vocab_size)
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in p.stop_token_ids):
            # SGLang accepts them (its kits send a Llama-3 id to every model): they can never match.
            outside = [t for t in p.stop_token_ids if not 0 <= t < vocab_size]
            logger.debug("%s.stop_token_ids: ignoring %s, outside the vocabulary [0, %d)", prefix, outside, vocab_size)
            p = p.replace(stop_token_ids=tuple(t for t in p.stop_token_ids if 0 <= t < vocab_size))
        return p

    def _validate(self, prefix: str, vocab_size: int | None) -> None:
        def bad(name: str, msg: str) -> None:
            raise InvalidRequestError(f"{prefix}.{name}", msg)

        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.min_new_tokens < 0 or self.min_new_tokens > max(self.max_new_tokens, 0):
            bad("min_new_tokens", "must be between 0 and max_new_tokens")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or >= 1")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            bad("repetition_penalty", "must be in (0, 2]")
        if not 1 <= self.n <= 128:
            bad("n", "must be in [1, 128]")
        if sum(x is not None for x in (self.regex, self.json_schema, self.ebnf)) > 1:
            bad("regex", "regex, json_schema and ebnf are mutually exclusive")
        if vocab_size is not None:
            for tid, _ in self.logit_bias:
                if not 0 <= tid < vocab_size:
                    bad("logit_bias", f"token id {tid} is outside the vocabulary [0, {vocab_size})")
        for s in self.stop:
            if not s:
                bad("stop", "stop strings must be non-empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if sum(map(len, self.stop)) > MAX_STOP_CHARS:
            bad("stop", f"the stop strings may have at most {MAX_STOP_CHARS} characters in all")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} distinct token ids, got {len(self.stop_token_ids)}")
        why = validate_stop_regexes(self.stop_regex)
        if why is not None:
            bad("stop_regex", why)


def _coerce(values: dict[str, Any], defaults: SamplingParams, prefix: str) -> SamplingParams:
    from radixlm.runtime.field_checks import MAX_INT, require_int, require_number

    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        default = getattr(defaults, key)
        try:
            if key in ("stop", "stop_regex"):
                if not isinstance(value, (str, list)):
                    raise InvalidRequestError(name, "must be a string or a list of strings")
                out[key] = (value,) if isinstance(value, str) else tuple(
                    _require_str(v, f"{name}[{i}]") for i, v in enumerate(value))
            elif key == "stop_token_ids":
                if not isinstance(value, list):
                    raise InvalidRequestError(name, "must be a list of token ids")
                # (repeats dropped; outside the vocabulary: ignored below)
                out[key] = tuple(dict.fromkeys(require_int(v, f"{name}[{i}]") for i, v in enumerate(value)))
            elif key == "logit_bias":
                if not isinstance(value, dict):
                    raise InvalidRequestError(name, "must be an object mapping token id to bias")
                out[key] = tuple(sorted((int(k), require_number(v, f"{name}.{k}", -100, 100))
                                        for k, v in value.items()))
            elif key == "json_schema" and isinstance(value, dict):
                import json

                out[key] = json.dumps(value)
            elif key in ("regex", "json_schema", "ebnf"):
                out[key] = _require_str(value, name)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise InvalidRequestError(name, "must be a boolean")
                out[key] = value
            elif isinstance(default, int) or key == "seed":
                out[key] = require_int(value, name, -MAX_INT - 1)
            elif isinstance(default, float):
                out[key] = require_number(value, name)
            else:
                out[key] = value
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidRequestError):
                raise
            raise InvalidRequestError(name, f"invalid value {value!r}") from None
    return dataclasses.replace(defaults, **out)


def _require_str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(name, "must be a string")
    return value
