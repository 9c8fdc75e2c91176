"""Issue 16.7 (1): /generate request validation on pydantic models vs our hand-written parser
(runtime/generate_request.py + sampling_params.py + field_checks.py), side by side on the same bodies.

The pydantic models below are the candidate: GenerateReqInput / SamplingParams as pydantic v2 would
write them (strict types, Field bounds, allow_inf_nan=False, unions for "one value or one per
prompt"), with validators only for what pydantic cannot say declaratively (exactly one of text /
input_ids, per-prompt list lengths, the vocabulary range, top_k's hole at 0, lone surrogates...).

Bodies: the /generate cases of tests/server/test_fuzz.py (its well-typed and ill-typed strategies,
drawn with a fixed seed) plus hand-written edge cases. Measured per body:
  * agreement: both accept, or both refuse;
  * the field: the refused field's path (ours: InvalidRequestError.field; pydantic: the first
    error's loc, union-branch tags dropped) — the same path, and a path naming a field of the body;
  * time: microseconds per body (ours: to the SamplingParams the scheduler gets; pydantic: to a
    model instance, before any conversion — in pydantic's favour).

    python benchmarks/alt_validation.py [--examples 400] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.server.test_fuzz: the fuzz strategies
VOCAB = 49152  # the default model's


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and math.isfinite(v) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral), Field(ge=-2**63, le=2**63 - 1)]
NonNegInt = Annotated[int, BeforeValidator(_integral), Field(ge=0, le=2**63 - 1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class PydSamplingParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    max_new_tokens: NonNegInt | None = None
    min_new_tokens: NonNegInt | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    stop_token_ids: list[Int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    ignore_eos: bool | None = None
    n: Annotated[int, BeforeValidator(_integral), Field(ge=1, le=128)] | None = None
    seed: Int | None = None
    sampling_seed: Int | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    structural_tag: None = None  # refused when set
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and (v == 0 or v < -1):
            raise ValueError("must be -1 (disabled) or >= 1")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None, info: ValidationInfo) -> dict[str, float] | None:
        for key in v or {}:
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < (info.context or {}).get("vocab", 2**63):
                raise ValueError(f"token id {key} is not in the vocabulary")
        return v

    @field_validator("stop_regex")
    @classmethod
    def _stop_regex(cls, v: str | list[str] | None) -> str | list[str] | None:
        from radixlm.runtime.stop_regex import validate

        for pattern in [v] if isinstance(v, str) else v or []:
            why = validate(pattern)
            if why:
                raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _cross(self) -> "PydSamplingParams":
        if (self.min_new_tokens or 0) > (128 if self.max_new_tokens is None else self.max_new_tokens):
            raise ValueError("min_new_tokens must be between 0 and max_new_tokens")
        if sum(x is not None for x in (self.regex, self.json_schema, self.ebnf)) > 1:
            raise ValueError("regex, json_schema and ebnf are mutually exclusive")
        return self


def _per_prompt(t: Any) -> Any:
    return t | list[t] | None


class PydGenerateReqInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    text: str | Annotated[list[str], Field(min_length=1)] | None = None
    input_ids: list[NonNegInt] | list[list[NonNegInt]] | None = None
    sampling_params: _per_prompt(PydSamplingParams) = None
    rid: _per_prompt(NonEmptyStr) = None
    stream: bool = False
    return_logprob: _per_prompt(bool) = None
    logprob_start_len: _per_prompt(Annotated[int, BeforeValidator(_integral), Field(ge=-1, le=2**63 - 1)]) = None
    top_logprobs_num: _per_prompt(Annotated[int, BeforeValidator(_integral), Field(ge=0, le=100)]) = None
    return_text_in_logprobs: bool | None = None
    extra_key: _per_prompt(str) = None
    cache_salt: _per_prompt(str) = None
    log_metrics: bool | None = None
    priority: int | None = None
    bootstrap_host: str | list[Any] | None = None
    bootstrap_port: int | list[Any] | None = None
    bootstrap_room: int | list[Any] | None = None
    data_parallel_rank: int | None = None
    no_logs: bool | None = None
    background: bool | None = None
    conversation_id: str | None = None
    modalities: list[Any] | None = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    input_embeds: Any = None
    custom_logit_processor: Any = None
    lora_path: Any = None
    session_params: Any = None
    return_hidden_states: Any = None
    token_ids_logprob: Any = None

    @model_validator(mode="before")
    @classmethod
    def _surrogates(cls, data: Any) -> Any:
        from radixlm.runtime.field_checks import find_unencodable

        where = find_unencodable(data)
        if where is not None:
            raise ValueError(f"{ascii(where)}: contains a lone surrogate (invalid Unicode)")
        return data

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> "PydGenerateReqInput":
        for name in ("image_data", "video_data", "audio_data", "input_embeds", "custom_logit_processor", "lora_path",
                     "session_params", "return_hidden_states", "token_ids_logprob"):
            if getattr(self, name) not in (None, [], ""):
                raise ValueError(f"{name} is not supported by this server")
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text and input_ids is required")
        batch = isinstance(self.text, list) or bool(self.input_ids) and isinstance(self.input_ids[0], list)
        n = len(self.text) if isinstance(self.text, list) else len(self.input_ids) if batch else 1
        vocab = (info.context or {}).get("vocab", 2**63)
        for ids in (self.input_ids if batch else [self.input_ids or []]) if self.text is None else []:
            if any(t >= vocab for t in ids):
                raise ValueError("token id outside the vocabulary")
        for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "extra_key",
                     "cache_salt"):
            value = getattr(self, name)
            if isinstance(value, list) and (not batch or len(value) != n):
                raise ValueError(f"{name}: one value, or one per prompt in a batch")
        return self


# ------------------------------------------------------------------------------ the bodies
EDGE_CASES: list[dict[str, Any]] = [
    {"text": "hi"}, {"text": "hi", "sampling_params": {"max_new_tokens": 2.0}},
    {"text": "hi", "sampling_params": {"max_new_tokens": "2"}}, {"text": "hi", "sampling_params": {"max_new_tokens": True}},
    {"text": "hi", "sampling_params": {"temperature": float("nan")}}, {"text": "hi", "sampling_params": {"top_p": 0}},
    {"text": "hi", "sampling_params": {"top_k": 0}}, {"text": "hi", "sampling_params": {"seed": 2**63}},
    {"text": "hi", "sampling_params": {"stop": ""}}, {"text": "hi", "sampling_params": {"stop": ["a", 3]}},
    {"text": "hi", "sampling_params": {"logit_bias": {"x": 1}}}, {"text": "hi", "sampling_params": {"logit_bias": {"99999": 1}}},
    {"text": "hi", "sampling_params": {"regex": "a", "json_schema": "{}"}},
    {"text": "hi", "sampling_params": {"stop_regex": "a*"}}, {"text": "hi", "sampling_params": {"min_new_tokens": 5}},
    {"text": "hi", "sampling_params": {"stop_token_ids": [128009]}}, {"text": "hi", "sampling_params": {"unknown": 1}},
    {"text": "a\ud800"}, {"text": "hi", "input_ids": [1]}, {}, {"text": []}, {"text": ["a", 1]},
    {"input_ids": [1, 99999]}, {"input_ids": [[1], [2]], "sampling_params": [{}, {}]},
    {"text": ["a", "b"], "rid": ["x"]}, {"text": "a", "rid": ["x"]}, {"text": "a", "rid": ""},
    {"text": "a", "top_logprobs_num": 101}, {"text": "a", "image_data": "x.png"}, {"text": "a", "stream": 1},
    {"text": "a", "priority": True}, {"text": "a", "sampling_params": []}, ["not", "an", "object"],
]


def fuzz_bodies(examples: int) -> list[Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.server.test_fuzz import ill_typed_bodies, typed_bodies

    bodies: list[Any] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(typed_bodies, ill_typed_bodies()))
    def draw(case: tuple[str, Any]) -> None:
        if case[0] == "/generate":
            bodies.append(case[1])

    draw()
    return bodies


# ------------------------------------------------------------------------------ measuring
def ours(body: Any) -> str | None:
    """None when accepted, else the field path named."""
    from radixlm.runtime.generate_request import parse_generate_request
    from radixlm.runtime.sampling_params import InvalidRequestError

    try:
        parse_generate_request(body, VOCAB)
    except InvalidRequestError as exc:
        return exc.field
    except Exception as exc:  # not a validation error: in a server, a 500
        return f"CRASH {type(exc).__name__}: {exc}"
    return None


def pyd(body: Any) -> str | None:
    try:
        PydGenerateReqInput.model_validate(body, context={"vocab": VOCAB})
    except ValidationError as exc:
        return _loc(exc.errors()[0]["loc"]) or "body"
    except Exception as exc:  # not a validation error: in a server, a 500
        return f"CRASH {type(exc).__name__}: {exc}"
    return None


def _loc(loc: tuple[Any, ...]) -> str:
    """('sampling_params', 'PydSamplingParams', 'top_p') -> sampling_params.top_p; union-branch tags
    (model names, 'list[str]', 'function-after[...]', 'constrained-str') are not fields."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not any(ch in part for ch in "[]-") and not part.startswith("Pyd") and part not in ("str", "int", "bool", "float"):
            path += f".{part}" if path else part
    return path


def top_field(path: str | None) -> str | None:
    return None if path is None else path.split(".")[0].split("[")[0]


def per_body_us(fn: Any, bodies: list[Any], repeat: int) -> float:
    times = []
    for body in bodies:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(body)
            best = min(best, time.perf_counter() - t0)
        times.append(best * 1e6)
    return statistics.median(times)


def main() -> None:
    import logging

    logging.getLogger("radixlm").setLevel(logging.ERROR)  # ours logs every ignored unknown field
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=400, help="hypothesis examples drawn (/generate ones kept); 0: edge cases only")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bodies = EDGE_CASES + (fuzz_bodies(args.examples) if args.examples else [])
    rows = []
    for body in bodies:
        a, b = ours(body), pyd(body)
        keys = set(body) if isinstance(body, dict) else set()
        rows.append({"body": json.dumps(body, allow_nan=True)[:300], "ours": a, "pydantic": b,
                     "agree": (a is None) == (b is None),
                     "same_field": a is not None and b is not None and a == b,
                     "ours_names_body_field": a is not None and top_field(a) in keys,
                     "pydantic_names_body_field": b is not None and top_field(b) in keys})
    refused_by_both = [r for r in rows if r["ours"] is not None and r["pydantic"] is not None]
    summary = {
        "bodies": len(rows), "edge_cases": len(EDGE_CASES),
        "accepted": {"ours": sum(r["ours"] is None for r in rows), "pydantic": sum(r["pydantic"] is None for r in rows)},
        "agree": sum(r["agree"] for r in rows),
        "crashes": {"ours": sum(str(r["ours"]).startswith("CRASH") for r in rows),
                    "pydantic": sum(str(r["pydantic"]).startswith("CRASH") for r in rows)},
        "crash_examples": [r for r in rows if str(r["pydantic"]).startswith("CRASH")][:5],
        "refused_by_both": len(refused_by_both),
        "same_field_path": sum(r["same_field"] for r in refused_by_both),
        "names_a_field_of_the_body": {"ours": sum(r["ours_names_body_field"] for r in refused_by_both),
                                      "pydantic": sum(r["pydantic_names_body_field"] for r in refused_by_both)},
        "median_us_per_body": {"ours": round(per_body_us(ours, bodies, args.repeat), 1),
                               "pydantic": round(per_body_us(pyd, bodies, args.repeat), 1)},
        "disagreements": [r for r in rows if not r["agree"]][:25],
        "different_field": [r for r in refused_by_both if not r["same_field"]][:25],
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
