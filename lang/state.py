"""`ProgramState` (the `s` of a program) and `ProgramStateGroup` (what `s.fork(n)` returns)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from radixlm.lang.interpreter import StreamExecutor
from radixlm.lang.ir import SglConstantText, SglExprList, SglRoleBegin, SglRoleEnd, SglVarScopeBegin, SglVarScopeEnd, as_expr


class _RoleBlock:
    """`s.user("hi")` appends at once; `with s.user():` wraps the block. One object serves both."""

    def __init__(self, state: "ProgramState", role: str) -> None:
        self.state, self.role = state, role

    def __enter__(self) -> "_RoleBlock":
        self.state.stream_executor.submit(SglRoleBegin(self.role))
        return self

    def __exit__(self, *exc: object) -> None:
        self.state.stream_executor.submit(SglRoleEnd(self.role))


class ProgramState:
    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    # ------------------------------------------------------------------------------ appending
    def __iadd__(self, other: Any) -> "ProgramState":
        if other is None:
            raise ValueError("cannot append None to a program state")
        self.stream_executor.submit(other)
        return self

    def _role_common(self, role: str, expr: Any = None) -> _RoleBlock | None:
        if expr is None:
            return _RoleBlock(self, role)
        self.stream_executor.submit(SglExprList([SglRoleBegin(role), as_expr(expr), SglRoleEnd(role)]))
        return None

    def system(self, expr: Any = None) -> _RoleBlock | None:
        return self._role_common("system", expr)

    def user(self, expr: Any = None) -> _RoleBlock | None:
        return self._role_common("user", expr)

    def assistant(self, expr: Any = None) -> _RoleBlock | None:
        return self._role_common("assistant", expr)

    @contextmanager
    def role(self, name: str) -> Iterator[None]:
        with _RoleBlock(self, name):
            yield

    @contextmanager
    def var_scope(self, name: str) -> Iterator[None]:
        self.stream_executor.submit(SglVarScopeBegin(name))
        yield
        self.stream_executor.submit(SglVarScopeEnd(name))

    # ------------------------------------------------------------------------------ forking
    def fork(self, size: int = 1, position_ids_offset: Any = None) -> "ProgramStateGroup":
        children = self.stream_executor.fork(size, position_ids_offset)
        return ProgramStateGroup([ProgramState(c) for c in children], self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None) -> Iterator["ProgramState"]:
        group = self.fork(1, position_ids_offset)
        try:
            yield group[0]
        finally:
            group.join(mode="concate_and_append")

    # ------------------------------------------------------------------------------ reading
    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, Any]]:
        self.stream_executor.sync()
        return list(self.stream_executor.messages_)

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        self.stream_executor.sync()
        return self.stream_executor.error_

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str) -> Any:
        self.stream_executor.get_var(name)  # waits for it, and explains unknown names
        return self.stream_executor.meta_info.get(name)

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    # ------------------------------------------------------------------------------ streaming
    def _next_chunk(self, var_name: str | None, pos: int, timeout: float | None = None) -> tuple[str, bool]:
        """Block until the text (or the variable) grows past `pos`, or until it can grow no more."""
        ex = self.stream_executor
        with ex.cond:
            while True:
                cur = ex.text_ if var_name is None else ex.variables.get(var_name)
                cur = cur if isinstance(cur, str) else ""
                if var_name is None:
                    done = ex.is_finished
                else:
                    event = ex.variable_event.get(var_name)
                    done = ex.is_finished or (event is not None and event.is_set())
                if len(cur) > pos or done:
                    return cur[pos:], done and len(cur) <= pos
                if not ex.cond.wait(timeout) and timeout is not None:
                    return "", False

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text deltas as they are generated (with run(stream=True)); otherwise the final value once."""
        if not self.stream_executor.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        pos = 0
        while True:
            chunk, done = self._next_chunk(var_name, pos)
            if done:
                break
            pos += len(chunk)
            yield chunk
        if var_name is not None:
            self.get_var(var_name)  # an unknown name or a failed program raises here

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        if not self.stream_executor.stream:
            value = await loop.run_in_executor(None, lambda: self.text() if var_name is None else self.get_var(var_name))
            yield (value, self._meta(var_name)) if return_meta_data else value
            return
        pos = 0
        while True:
            chunk, done = await loop.run_in_executor(None, self._next_chunk, var_name, pos, 1.0)
            if done:
                break
            if not chunk:
                continue
            pos += len(chunk)
            yield (chunk, self._meta(var_name)) if return_meta_data else chunk

    def _meta(self, var_name: str | None) -> Any:
        return self.stream_executor.meta_info.get(var_name) if var_name is not None else None

    # ------------------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    def __del__(self) -> None:
        ex = getattr(self, "stream_executor", None)
        if ex is not None:
            ex.stop_worker()


class ProgramStateGroup:
    def __init__(self, states: list[ProgramState], src_state: ProgramState) -> None:
        self.states = states
        self.src_state = src_state

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """`forks[i] += expr` appends in place, then Python stores the result back: accept exactly that."""
        if value is not self.states[i]:
            raise TypeError("fork states cannot be replaced; append to them with `forks[i] += ...`")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "ProgramStateGroup":
        """One expression for all branches, a callable `i -> expr`, or a list with one per branch."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"got {len(other)} expressions for {len(self.states)} forks")
            for state, expr in zip(self.states, other):
                state += expr
        elif callable(other) and not hasattr(other, "flatten"):
            fn: Callable[[int], Any] = other
            for i, state in enumerate(self.states):
                state += fn(i)
        else:
            for state in self.states:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each new variable comes back as a list of per-branch values.
        concate_and_append: each branch's new text is appended to the parent, in order."""
        for state in self.states:
            state.sync()
        parent = self.src_state.stream_executor
        parent.sync()
        if mode == "gather_variable":
            before = set(parent.variables)
            names: list[str] = []
            for state in self.states:
                names += [n for n in state.stream_executor.variables if n not in before and n not in names]
            for name in names:
                parent.meta_info[name] = [s.stream_executor.meta_info.get(name) for s in self.states]
                parent.set_var(name, [s.stream_executor.variables.get(name) for s in self.states])
        elif mode == "concate_and_append":
            pieces = []
            for state in self.states:
                ex = state.stream_executor
                pieces.append(SglConstantText(ex.text_[ex.fork_start_text_pos or 0:]))
            self.src_state += SglExprList(pieces)
        else:
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
