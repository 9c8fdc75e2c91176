"""The program IR: the nodes a program appends to its state, and the sampling parameters of a gen."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

# Typed-output patterns. Only the native backends (RuntimeEndpoint, Engine) turn `dtype` into
# these; the int/float forms let trailing blanks through because " " and "\n" are added as stops.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?[ \n]*"
REGEX_STR = r"\"[\w\d\s]*\""
REGEX_BOOL = r"(True|False)"
# json_schema value for "any JSON document" in SGLang's wire protocol (the server's constrained.schema
# has its own copy: the DSL must not import the server's packages, which load torch).
ANY_JSON = "$$ANY$$"

_DTYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}


def normalize_dtype(dtype: Any) -> str | None:
    """Accept `int` or `"int"` alike; anything else is a programming error caught at build time."""
    if dtype is None:
        return None
    name = _DTYPE_NAMES.get(dtype, dtype)
    if name not in ("int", "float", "str", "bool"):
        raise ValueError(f"gen(dtype=...): expected int, float, str or bool, got {dtype!r}")
    return name


def schema_to_str(schema: Any) -> str | None:
    """json_schema may be a JSON string, a dict, or a pydantic model class (duck-typed: no import)."""
    if schema is None or isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    to_schema = getattr(schema, "model_json_schema", None) or getattr(schema, "schema", None)
    if isinstance(schema, type) and callable(to_schema):
        return json.dumps(to_schema())
    raise TypeError(f"json_schema: expected a JSON string, a dict or a pydantic model class, got {type(schema).__name__}")


@dataclass
class SglSamplingParams:
    """Resolved sampling parameters of one gen: run-level defaults overridden by the gen's own."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] | tuple[str, ...] = ()
    stop_token_ids: list[int] | tuple[int, ...] = ()
    stop_regex: str | list[str] | tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    json_schema: str | None = None
    dtype: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    def clone(self) -> "SglSamplingParams":
        return dataclasses.replace(self)

    def merged(self, overrides: dict[str, Any]) -> "SglSamplingParams":
        """Every non-None override wins (SGLang's `_resolve_sampling_params` precedence)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def add_stop(self, extra: tuple[str, ...] | list[str]) -> None:
        if extra:
            self.stop = self.stop_list() + [s for s in extra if s not in self.stop_list()]

    def constraint_kinds(self) -> list[str]:
        return [k for k in ("regex", "json_schema", "ebnf") if getattr(self, k) is not None]

    def to_srt_kwargs(self) -> dict[str, Any]:
        """The `sampling_params` object of a native /generate request, in SGLang's field order."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "n": self.n,
            "stop": self.stop if isinstance(self.stop, str) else list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "stop_regex": self.stop_regex if isinstance(self.stop_regex, str) else list(self.stop_regex),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
            "regex": self.regex,
            "json_schema": self.json_schema,
        }
        if self.ebnf is not None:
            out["ebnf"] = self.ebnf
        return out

    def logprob_kwargs(self) -> dict[str, Any]:
        """Top-level /generate fields, sent only when set (as SGLang's client does)."""
        names = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


# ------------------------------------------------------------------------------------------ nodes
class SglExpr:
    """Base of every IR node. `+` builds a concatenation, so `"Q: " + gen("a")` is one expression."""

    node_counter = 0

    def __init__(self) -> None:
        SglExpr.node_counter += 1
        self.node_id = SglExpr.node_counter
        self.prev_node: SglExpr | None = None  # set by the tracer to link the program graph
        self.pid: int | None = None

    def __add__(self, other: Any) -> "SglExprList":
        return SglExprList([self, as_expr(other)])

    def __radd__(self, other: Any) -> "SglExprList":
        return SglExprList([as_expr(other), self])

    def flatten(self) -> list["SglExpr"]:
        return [self]

    def print_graph_dfs(self) -> str:
        """One line per node from the first to this one; returned and printed (for debugging)."""
        chain: list[SglExpr] = []
        node: SglExpr | None = self
        seen: set[int] = set()
        while node is not None and node.node_id not in seen:
            seen.add(node.node_id)
            chain.append(node)
            node = node.prev_node
        lines = [f"%{n.node_id} = {n!r}" for n in reversed(chain)]
        text = "\n".join(lines)
        print(text)
        return text


def as_expr(value: Any) -> SglExpr:
    if isinstance(value, SglExpr):
        return value
    if isinstance(value, str):
        return SglConstantText(value)
    if value is None:
        raise ValueError("cannot append None to a program")
    # Anything else (numbers, ...) is appended as its text, as f-strings would.
    return SglConstantText(str(value))


class SglExprList(SglExpr):
    def __init__(self, expr_list: list[SglExpr]) -> None:
        super().__init__()
        self.expr_list = [e for x in expr_list for e in x.flatten()]

    def flatten(self) -> list[SglExpr]:
        return list(self.expr_list)

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


class SglConstantText(SglExpr):
    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglArgument(SglExpr):
    """A program argument seen while tracing. f-strings would silently bake in its repr: refuse."""

    def __init__(self, name: str, value: Any = None) -> None:
        super().__init__()
        self.name = name
        self.value = value

    def __format__(self, spec: str) -> str:
        raise TypeError(f"cannot format traced argument {self.name!r} in an f-string; use `+` to concatenate it")

    def __repr__(self) -> str:
        return f"Argument({self.name})"


class SglGen(SglExpr):
    def __init__(self, name: str | None, overrides: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.overrides = {k: v for k, v in overrides.items() if v is not None}

    @property
    def dtype(self) -> str | None:
        return self.overrides.get("dtype")

    def resolve(self, defaults: SglSamplingParams) -> SglSamplingParams:
        params = defaults.merged(self.overrides)
        if params.dtype is not None:
            params.regex = None  # dtype wins; gen() already warned
        return params

    def __repr__(self) -> str:
        return f"Gen({self.name!r}, {self.overrides})"


class SglSelect(SglExpr):
    def __init__(self, name: str | None, choices: list[str], temperature: float, choices_method: Callable) -> None:
        super().__init__()
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglImage(SglExpr):
    def __init__(self, path: Any) -> None:
        super().__init__()
        self.path = path

    def __repr__(self) -> str:
        return f"Image({self.path!r})"


class SglVideo(SglExpr):
    def __init__(self, path: Any, num_frames: int) -> None:
        super().__init__()
        self.path = path
        self.num_frames = num_frames

    def __repr__(self) -> str:
        return f"Video({self.path!r}, {self.num_frames})"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeBegin({self.name!r})"


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __repr__(self) -> str:
        return f"VarScopeEnd({self.name!r})"


class SglCommitLazy(SglExpr):
    """Prefill the text so far into the server's prefix cache (a max_new_tokens=0 request)."""

    def __repr__(self) -> str:
        return "CommitLazy()"


class SglVariable(SglExpr):
    """A reference to a variable produced earlier (tracing only)."""

    def __init__(self, name: str, source: SglExpr | None = None) -> None:
        super().__init__()
        self.name = name
        self.source = source

    def __repr__(self) -> str:
        return f"Variable({self.name!r})"


class SglFork(SglExpr):
    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def __repr__(self) -> str:
        return f"Fork({self.number})"


class SglGetForkItem(SglExpr):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def __repr__(self) -> str:
        return f"GetForkItem({self.index})"


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


def check_regex(regex: str | None) -> str | None:
    """Invalid patterns fail where the program is written, not inside a worker thread."""
    if regex is not None:
        re.compile(regex)
    return regex
