"""`StreamExecutor`: runs one program state's nodes in order on a worker thread, so `s += gen(...)`
returns at once and a program's forks proceed concurrently (the server batches them)."""
from __future__ import annotations

import logging
import queue
import threading
import traceback
import uuid
from typing import Any

from radixlm.lang.api_speculation import ChatSpeculation, CompletionSpeculation
from radixlm.lang.backend.base import BaseBackend
from radixlm.lang.chat_template import ChatTemplate
from radixlm.lang.ir import (
    SglCommitLazy,
    SglConstantText,
    SglExpr,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    SglVideo,
    as_expr,
)

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel: the worker thread exits


class ProgramError(RuntimeError):
    """A variable was never produced because an earlier step of the program failed."""


class StreamExecutor:
    def __init__(
        self,
        backend: BaseBackend,
        arguments: dict[str, Any],
        default_sampling_para: SglSamplingParams,
        chat_template: ChatTemplate | None = None,
        stream: bool = False,
        num_api_spec_tokens: int | None = None,
        use_thread: bool = True,
    ) -> None:
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling_para = default_sampling_para
        self.stream = stream
        self.num_api_spec_tokens = num_api_spec_tokens
        self.chat_template = chat_template or backend.get_chat_template()
        self.use_thread = use_thread
        self.speculation: ChatSpeculation | CompletionSpeculation | None = None
        if num_api_spec_tokens and not stream:  # streaming sends every gen as it comes (as SGLang)
            chat = getattr(backend, "is_chat_model", False)
            self.speculation = (ChatSpeculation if chat else CompletionSpeculation)(num_api_spec_tokens)

        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.variable_event: dict[str, threading.Event] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self.cur_role_begin_pos: int | None = None
        self.cur_images: list[Any] = []
        self.images_: list[Any] = []
        self.var_scope_begin_pos: dict[str, int] = {}
        self.fork_start_text_pos: int | None = None
        self.error_: BaseException | None = None
        self.is_finished = False
        # Wakes streaming readers whenever text or a variable grows, or the program ends.
        self.cond = threading.Condition()

        self.queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.backend.begin_program(self)

    # ------------------------------------------------------------------------------ queueing
    def submit(self, expr: Any) -> None:
        nodes = as_expr(expr).flatten()
        for node in nodes:
            self._init_var_event(node)
        if not self.use_thread:
            for node in nodes:
                self._run_node(node)
            return
        with self._worker_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_loop, name=f"sgl-program-{self.sid[:8]}", daemon=True)
                self._worker.start()
            for node in nodes:
                self.queue.put(node)

    def _init_var_event(self, node: SglExpr) -> None:
        name = getattr(node, "name", None)
        if isinstance(node, (SglGen, SglSelect, SglVarScopeBegin)) and name is not None:
            self.variable_event[name] = threading.Event()

    def _worker_loop(self) -> None:
        while True:
            node = self.queue.get()
            try:
                if node is _STOP:
                    with self._worker_lock:  # exit only if nothing was queued meanwhile
                        if self.queue.empty():
                            self._worker = None
                            return
                    continue
                self._run_node(node)
            finally:
                self.queue.task_done()

    def stop_worker(self) -> None:
        """Let the worker thread exit once its queue is drained; a later submit starts a new one."""
        with self._worker_lock:
            if self._worker is not None:
                self.queue.put(_STOP)

    def _run_node(self, node: SglExpr) -> None:
        if self.error_ is not None:
            self._release(node)  # after a failure, later steps are skipped but never hang readers
            return
        try:
            self._execute(node)
        except Exception as exc:  # noqa: BLE001 - recorded, surfaced by error() and variable access
            self.error_ = exc
            logger.warning("program step %r failed:\n%s", node, traceback.format_exc())
            self._release(node)
            for event in self.variable_event.values():
                event.set()
            self._notify()

    def _release(self, node: SglExpr) -> None:
        name = getattr(node, "name", None)
        if name is not None and name in self.variable_event:
            self.variable_event[name].set()

    def sync(self) -> None:
        if self.use_thread:
            self.queue.join()

    def end(self) -> None:
        """The program body is done: drain the queue, stop the worker, tell streaming readers."""
        self.sync()
        self.stop_worker()
        self.backend.end_program(self)
        with self.cond:
            self.is_finished = True
            self.cond.notify_all()

    def _notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------------------ variables
    def get_var(self, name: str) -> Any:
        if name not in self.variable_event and name not in self.variables:
            known = ", ".join(sorted(set(self.variables) | set(self.variable_event))) or "none"
            raise KeyError(f"unknown variable {name!r} (variables of this program: {known})")
        event = self.variable_event.get(name)
        if event is not None:
            event.wait()
        if name not in self.variables:
            raise ProgramError(f"variable {name!r} was not produced: the program failed with "
                               f"{type(self.error_).__name__}: {self.error_}") from self.error_
        return self.variables[name]

    def set_var(self, name: str, value: Any) -> None:
        self.variables[name] = value
        self.variable_event.setdefault(name, threading.Event()).set()

    # ------------------------------------------------------------------------------ execution
    def _execute(self, node: SglExpr) -> None:
        if isinstance(node, SglConstantText):
            self._fill_content(node.value)
        elif isinstance(node, SglGen):
            self._execute_gen(node)
        elif isinstance(node, SglSelect):
            self._execute_select(node)
        elif isinstance(node, SglRoleBegin):
            self._execute_role_begin(node)
        elif isinstance(node, SglRoleEnd):
            self._execute_role_end(node)
        elif isinstance(node, SglVarScopeBegin):
            self.var_scope_begin_pos[node.name] = len(self.text_)
        elif isinstance(node, SglVarScopeEnd):
            self.variables[node.name] = self.text_[self.var_scope_begin_pos.pop(node.name):]
            self.variable_event[node.name].set()
        elif isinstance(node, SglCommitLazy):
            self.backend.commit_lazy_operations(self)
        elif isinstance(node, (SglImage, SglVideo)):
            self._execute_image(node)
        elif isinstance(node, SglVariable):
            self._fill_content(str(self.get_var(node.name)))
        else:
            raise TypeError(f"cannot execute {node!r} in a program")

    def _defers_to_chat_speculation(self) -> bool:
        return isinstance(self.speculation, ChatSpeculation) and self.cur_role == "assistant"

    def _fill_content(self, text: str) -> None:
        """Text the program appends (not a role's prefix or suffix)."""
        if self._defers_to_chat_speculation():
            assert isinstance(self.speculation, ChatSpeculation)
            self.speculation.defer_text(text)
            return
        self._fill(text)

    def _fill(self, text: str) -> None:
        if isinstance(self.speculation, CompletionSpeculation):
            self.speculation.on_fill(text)
        self._append(text)

    def _append(self, text: str) -> None:
        with self.cond:
            self.text_ += text
            self.cond.notify_all()

    def resolve_sampling_params(self, node: SglGen) -> SglSamplingParams:
        """Run-level defaults, then every value the gen sets. Inside a role block the template's
        stop strings are added (they end the turn). Outside roles the text is no chat turn and the
        gen's own stops are sent as given: SGLang adds the template's stops to every gen, but picks
        its `default` template (no stop strings) for models it does not know, this one included, so
        its frontend sends exactly these bodies (docs/sglang_compat.md)."""
        params = node.resolve(self.default_sampling_para)
        if self.cur_role is not None:
            params.add_stop(self.chat_template.stop_str)
        return params

    def _execute_gen(self, node: SglGen) -> None:
        params = self.resolve_sampling_params(node)
        name = node.name
        if self._defers_to_chat_speculation():
            assert isinstance(self.speculation, ChatSpeculation)
            self.speculation.defer_gen(name, params)  # generated when the assistant block ends
            return
        if isinstance(self.speculation, CompletionSpeculation):
            value, meta = self.speculation.generate(self, params)
            self._append(value[0] if isinstance(value, list) else value)  # not _fill: it came from the speculation
        elif not self.stream:
            value, meta = self.backend.generate(self, params)
            self._fill(value[0] if isinstance(value, list) else value)
        else:
            value, meta = "", None
            if name is not None:
                self.variables[name] = ""
            for delta, meta in self.backend.generate_stream(self, params):
                with self.cond:
                    self.text_ += delta
                    value += delta
                    if name is not None:
                        self.variables[name] = value
                        self.meta_info[name] = meta
                    self.cond.notify_all()
        if name is not None:
            self.variables[name] = value
            self.meta_info[name] = meta
            self.variable_event[name].set()
            self._notify()

    def _execute_select(self, node: SglSelect) -> None:
        decision = self.backend.select(self, node.choices, node.temperature, node.choices_method)
        self._fill(decision.decision)
        if node.name is not None:
            self.variables[node.name] = decision.decision
            self.meta_info[node.name] = decision.meta_info
            self.variable_event[node.name].set()
            self._notify()

    def _execute_role_begin(self, node: SglRoleBegin) -> None:
        if self.cur_role is not None:
            raise AssertionError(f"Nested roles are not allowed: {node.role!r} inside {self.cur_role!r}")
        default_system = self.chat_template.default_system_prompt
        if not self.messages_ and node.role != "system" and default_system:
            self._execute_role_begin(SglRoleBegin("system"))
            self._fill(default_system)
            self._execute_role_end(SglRoleEnd("system"))
        prefix, _ = self.chat_template.get_prefix_and_suffix(node.role, self.messages_)
        self.cur_role = node.role
        self._fill(prefix)
        self.cur_role_begin_pos = len(self.text_)

    def _execute_role_end(self, node: SglRoleEnd) -> None:
        if self.cur_role != node.role:
            raise AssertionError(f"role end {node.role!r} does not match the open role {self.cur_role!r}")
        assert self.cur_role_begin_pos is not None
        if self._defers_to_chat_speculation():
            self._flush_chat_speculation()
        content: Any = self.text_[self.cur_role_begin_pos:].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(node.role, self.messages_)
        self._fill(suffix)
        if self.cur_images:
            content = [{"type": "text", "text": content}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{img}"}} for img in self.cur_images
            ]
            self.cur_images = []
        self.messages_.append({"role": node.role, "content": content})
        self.cur_role = None
        self.cur_role_begin_pos = None

    def _flush_chat_speculation(self) -> None:
        assert isinstance(self.speculation, ChatSpeculation)
        terms = self.speculation.flush(self)  # on failure the program fails (and releases every variable)
        for term in terms:
            self._fill(term.text)
            if term.name is not None:
                self.variables[term.name] = term.text
                self.meta_info[term.name] = {"speculative": True}
                self.variable_event[term.name].set()
        self._notify()

    def _execute_image(self, node: SglImage | SglVideo) -> None:
        if not self.backend.supports_images:
            kind = "video" if isinstance(node, SglVideo) else "image"
            raise NotImplementedError(
                f"sgl.{kind}(): {type(self.backend).__name__} serves text-only models; image and video inputs are not supported")
        raise NotImplementedError("image inputs are not implemented in radixlm")

    # ------------------------------------------------------------------------------ forking
    def fork(self, n: int, position_ids_offset: Any = None) -> list["StreamExecutor"]:
        """Children that start from this state's text, messages and variables."""
        self.sync()
        if n > 1 and self.text_:
            # Prefill the shared prefix once, so the branches hit the radix cache instead of racing.
            self.submit(SglCommitLazy())
            self.sync()
        children = []
        for _ in range(n):
            child = StreamExecutor(self.backend, self.arguments, self.default_sampling_para, self.chat_template,
                                   self.stream, self.num_api_spec_tokens, self.use_thread)
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.meta_info = dict(self.meta_info)
            for name in child.variables:
                child.variable_event[name] = threading.Event()
                child.variable_event[name].set()
            child.cur_role = self.cur_role
            child.cur_role_begin_pos = self.cur_role_begin_pos
            child.cur_images = list(self.cur_images)
            child.images_ = list(self.images_)
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        self.backend.fork_program(self, children, position_ids_offset)
        return children
