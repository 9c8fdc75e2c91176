"""The public constructors of the language (`sgl.gen`, `sgl.select`, roles, ...) and backend helpers."""
from __future__ import annotations

import warnings
from typing import Any, Callable

from radixlm.lang.choices import token_length_normalized
from radixlm.lang.function import SglFunction, function, resolve_backend
from radixlm.lang.global_config import global_config
from radixlm.lang.ir import (
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglVideo,
    as_expr,
    check_regex,
    normalize_dtype,
    schema_to_str,
)


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: Any = None,
    choices: list[str] | None = None,
    choices_method: Callable | None = None,
    regex: str | None = None,
    json_schema: Any = None,
    ebnf: str | None = None,
) -> SglExpr:
    """Generate into variable `name`; `choices` makes it a select. `json_schema` may also be a dict
    or a pydantic model class, and `ebnf` a grammar (both beyond SGLang's frontend)."""
    if choices is not None:
        return select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    dtype_name = normalize_dtype(dtype)
    check_regex(regex)
    if dtype_name is not None and regex is not None:
        warnings.warn(f"gen({name!r}): both dtype and regex are set; dtype wins", stacklevel=2)
        regex = None
    schema = schema_to_str(json_schema)
    constraints = [k for k, v in (("regex", regex), ("json_schema", schema), ("ebnf", ebnf)) if v is not None]
    if len(constraints) > 1:
        raise ValueError(f"gen({name!r}): {' and '.join(constraints)} are mutually exclusive")
    return SglGen(name, {
        "max_new_tokens": max_tokens, "min_new_tokens": min_tokens, "n": n, "stop": stop,
        "stop_token_ids": stop_token_ids, "stop_regex": stop_regex, "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "min_p": min_p, "frequency_penalty": frequency_penalty,
        "presence_penalty": presence_penalty, "ignore_eos": ignore_eos, "return_logprob": return_logprob,
        "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num,
        "return_text_in_logprobs": return_text_in_logprobs, "dtype": dtype_name, "regex": regex,
        "json_schema": schema, "ebnf": ebnf,
    })


def _typed_gen(dtype: type, name_: str) -> Callable[..., SglExpr]:
    """gen_int / gen_string: gen with a preset dtype and no regex, choices or min_tokens."""

    def typed(
        name: str | None = None, max_tokens: int | None = None, n: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None, temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
    ) -> SglExpr:
        return gen(name, max_tokens, None, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
                   frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
                   top_logprobs_num, return_text_in_logprobs, dtype=dtype)

    typed.__name__ = typed.__qualname__ = name_
    return typed


gen_int = _typed_gen(int, "gen_int")
gen_string = _typed_gen(str, "gen_string")


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: Callable = token_length_normalized) -> SglSelect:
    if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"select({name!r}): choices must be a non-empty list of strings, got {choices!r}")
    return SglSelect(name, list(choices), temperature, choices_method)


def image(expr: Any) -> SglImage:
    return SglImage(expr)


def video(path: str, num_frames: int) -> SglVideo:
    return SglVideo(path, num_frames)


def _role_common(role: str, expr: Any = None) -> SglExprList:
    if expr is None:
        return SglExprList([SglRoleBegin(role), SglRoleEnd(role)])
    return SglExprList([SglRoleBegin(role), as_expr(expr), SglRoleEnd(role)])


def system(expr: Any = None) -> SglExprList:
    return _role_common("system", expr)


def user(expr: Any = None) -> SglExprList:
    return _role_common("user", expr)


def assistant(expr: Any = None) -> SglExprList:
    return _role_common("assistant", expr)


def system_begin() -> SglRoleBegin:
    return SglRoleBegin("system")


def system_end() -> SglRoleEnd:
    return SglRoleEnd("system")


def user_begin() -> SglRoleBegin:
    return SglRoleBegin("user")


def user_end() -> SglRoleEnd:
    return SglRoleEnd("user")


def assistant_begin() -> SglRoleBegin:
    return SglRoleBegin("assistant")


def assistant_end() -> SglRoleEnd:
    return SglRoleEnd("assistant")


def set_default_backend(backend: Any) -> None:
    """Accepts a RuntimeEndpoint, a Runtime, an Engine (wrapped in-process) or any backend."""
    global_config.default_backend = resolve_backend(backend) if backend is not None else None


def flush_cache(backend: Any = None) -> Any:
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        return False
    return resolve_backend(backend).flush_cache()


def get_server_info(backend: Any = None) -> Any:
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        return None
    return resolve_backend(backend).get_server_info()


__all__ = [
    "SglFunction", "function", "gen", "gen_int", "gen_string", "select", "image", "video", "system", "user",
    "assistant", "system_begin", "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end",
    "set_default_backend", "flush_cache", "get_server_info",
]
