"""One option as the CLI, the config file and the docs see it, and how a ServerArgs field declares it.

The declarations themselves live in `server_args.py` and its per-feature parts (`lora_args.py`,
`speculative_args.py`); `flag_specs()` there collects them into the one list everything is built from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GROUPS: dict[str, str] = {  # group -> title, in --help order (SGLang's grouping)
    "model": "Model and tokenizer",
    "memory": "Memory and KV cache",
    "scheduling": "Scheduling",
    "constrained": "Constrained decoding",
    "speculative": "Speculative decoding",
    "parallel": "Parallelism",
    "lora": "LoRA adapters",
    "runtime": "Device and kernels",
    "server": "HTTP server",
    "logging": "Logging and metrics",
}


@dataclass(frozen=True)
class FlagSpec:
    """One option as the CLI, the config file and the docs see it."""

    name: str  # the ServerArgs field (and the config-file key)
    type: type  # str | int | float | bool (bool: a switch, --flag sets it)
    default: Any
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive lower bound of a number
    default_text: str | None = None  # how the docs show a default computed at start-up
    multiple: bool = False  # a list of values of `type` (--flag A B C; a list in the config file)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_default(self) -> str | None:
        if self.default_text is not None:
            return self.default_text
        if self.type is bool or self.default is None:
            return None
        return str(self.default)


def option(default: Any, group: str, help: str, type: type, **spec: Any) -> Any:
    """A dataclass field carrying its FlagSpec (less the name) as metadata."""
    return field(default=default, metadata={"flag": dict(default=default, group=group, help=help, type=type, **spec)})


def specs_of(cls: type) -> list[FlagSpec]:
    """The options a dataclass declares with `option`, grouped in GROUPS order, declaration order within a group."""
    specs = [FlagSpec(name=f.name, **f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]
    order = list(GROUPS)
    return sorted(specs, key=lambda spec: order.index(spec.group))


def check_value(spec: FlagSpec, value: Any) -> None:
    """Raises ValueError naming the option if `value` is not of its type, choices or range."""
    if value is None:
        if spec.default is not None:
            raise ValueError(f"{spec.name}: must be set (default {spec.default!r})")
        return
    if spec.multiple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{spec.name}: {value!r} is not a list")
        for item in value:
            check_value(dataclasses.replace(spec, multiple=False), item)
        return
    expected = (int, float) if spec.type is float else spec.type
    if not isinstance(value, expected) or (spec.type is not bool and isinstance(value, bool)):
        raise ValueError(f"{spec.name}: {value!r} is not {_TYPE_NAMES[spec.type]}")
    if spec.choices is not None and value not in spec.choices:
        raise ValueError(f"{spec.name}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"{spec.name}: {value} is below the minimum {spec.minimum:g}")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
