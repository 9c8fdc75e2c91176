"""Tracing: run a program body against placeholders to see its structure without a model.

Its main use is prefix caching: the constant text a program starts with (few-shot exemplars, a
system prompt rendered through the chat template) is prefilled once before a batch runs.
"""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from radixlm.lang.chat_template import ChatTemplate, get_chat_template
from radixlm.lang.ir import (
    SglArgument,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglFork,
    SglGen,
    SglGetForkItem,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    as_expr,
)

if TYPE_CHECKING:
    from radixlm.lang.function import SglFunction


class StopTracing(Exception):
    """Raised inside a prefix-only trace at the first node that is not constant text."""


class _TracerRole:
    def __init__(self, state: "TracerProgramState", role: str) -> None:
        self.state, self.role = state, role

    def __enter__(self) -> "_TracerRole":
        self.state._append(SglRoleBegin(self.role))
        return self

    def __exit__(self, *exc: object) -> None:
        self.state._append(SglRoleEnd(self.role))


class TracerProgramState:
    """Stands in for ProgramState: records nodes, renders roles through the chat template."""

    def __init__(self, backend: Any, arguments: dict[str, Any], only_trace_prefix: bool = False,
                 chat_template: ChatTemplate | None = None) -> None:
        self.pid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.only_trace_prefix = only_trace_prefix
        self.chat_template = chat_template or (backend.get_chat_template() if backend is not None else get_chat_template("default"))
        self.nodes: list[SglExpr] = []
        self.last_node: SglExpr | None = None
        self.variables: dict[str, SglVariable] = {}
        self.ret_value: Any = None
        self.child_states: list[TracerProgramState] = []
        self.cur_role: str | None = None
        self.num_messages = 0
        self._history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ recording
    def _link(self, node: SglExpr) -> None:
        if self.only_trace_prefix and not isinstance(node, SglConstantText):
            raise StopTracing()
        node.prev_node = self.last_node
        node.pid = self.pid  # type: ignore[assignment]
        self.last_node = node
        self.nodes.append(node)

    def _append(self, expr: Any) -> None:
        for node in as_expr(expr).flatten():
            if isinstance(node, SglRoleBegin):
                self._role_begin(node.role)
            elif isinstance(node, SglRoleEnd):
                self._role_end(node.role)
            else:
                self._link(node)
                if isinstance(node, (SglGen, SglSelect, SglVarScopeEnd)) and node.name is not None:
                    self.variables[node.name] = SglVariable(node.name, node)

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise AssertionError("Nested roles are not allowed.")
        default_system = self.chat_template.default_system_prompt
        if not self._history and role != "system" and default_system:
            self._role_begin("system")
            self._link(SglConstantText(default_system))
            self._role_end("system")
        prefix, _ = self.chat_template.get_prefix_and_suffix(role, self._history)
        self.cur_role = role
        self._link(SglConstantText(prefix))

    def _role_end(self, role: str) -> None:
        _, suffix = self.chat_template.get_prefix_and_suffix(role, self._history)
        self._link(SglConstantText(suffix))
        self._history.append({"role": role, "content": None})
        self.cur_role = None

    # ------------------------------------------------------------------------------ ProgramState API
    def __iadd__(self, other: Any) -> "TracerProgramState":
        self._append(other)
        return self

    def __getitem__(self, name: str) -> SglVariable:
        if name not in self.variables:
            raise KeyError(f"unknown variable {name!r} while tracing")
        return self.variables[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.variables[name] = SglVariable(name, as_expr(value))

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    get_var = __getitem__
    set_var = __setitem__

    def _role(self, role: str, expr: Any = None) -> _TracerRole | None:
        if expr is None:
            return _TracerRole(self, role)
        self._append(SglExprList([SglRoleBegin(role), as_expr(expr), SglRoleEnd(role)]))
        return None

    def system(self, expr: Any = None) -> _TracerRole | None:
        return self._role("system", expr)

    def user(self, expr: Any = None) -> _TracerRole | None:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> _TracerRole | None:
        return self._role("assistant", expr)

    def var_scope(self, name: str) -> Any:
        state = self

        class _Scope:
            def __enter__(self) -> None:
                state._append(SglVarScopeBegin(name))

            def __exit__(self, *exc: object) -> None:
                state._append(SglVarScopeEnd(name))

        return _Scope()

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> list["TracerProgramState"]:
        if self.only_trace_prefix:
            raise StopTracing()
        fork_node = SglFork(size)
        self._link(fork_node)
        children = []
        for i in range(size):
            child = TracerProgramState(self.backend, self.arguments, False, self.chat_template)
            item = SglGetForkItem(i)
            item.prev_node = fork_node
            child.last_node = item
            child.variables = dict(self.variables)
            child._history = list(self._history)
            children.append(child)
        self.child_states.extend(children)
        return children

    def text(self) -> str:
        return "".join(n.value for n in self.nodes if isinstance(n, SglConstantText))

    def flatten_nodes(self) -> list[SglExpr]:
        return list(self.nodes)


def extract_prefix_by_tracing(program: "SglFunction", backend: Any) -> str:
    """The constant text the program always starts with; tracing stops at the first non-constant."""
    arguments: dict[str, Any] = {name: SglArgument(name) for name in program.arg_names}
    arguments.update(program.bind_arguments)
    tracer = TracerProgramState(backend, arguments, only_trace_prefix=True)
    try:
        tracer.ret_value = program.func(tracer, **arguments)
    except Exception:  # noqa: BLE001 - StopTracing, or Python code that needs a real argument value
        pass
    prefix = []
    for node in tracer.flatten_nodes():
        if not isinstance(node, SglConstantText):
            break
        prefix.append(node.value)
    return "".join(prefix)


def trace_program(program: "SglFunction", arguments: dict[str, Any], backend: Any) -> TracerProgramState:
    """A full trace: unknown arguments become placeholders, forks become Fork/GetForkItem nodes."""
    args: dict[str, Any] = {name: SglArgument(name) for name in program.arg_names if name not in arguments}
    args.update(arguments)
    args.update(program.bind_arguments)
    tracer = TracerProgramState(backend, args, only_trace_prefix=False)
    tracer.ret_value = program.func(tracer, **args)
    return tracer
