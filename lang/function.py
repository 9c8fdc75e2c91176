"""`@sgl.function` programs: run one, run a batch on a thread pool, trace, and pre-cache the prefix."""
from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixlm.lang.backend.base import BaseBackend
from radixlm.lang.global_config import global_config
from radixlm.lang.interpreter import StreamExecutor
from radixlm.lang.ir import SglSamplingParams
from radixlm.lang.state import ProgramState


def resolve_backend(backend: Any = None) -> BaseBackend:
    """The given or default backend; a `Runtime` means its endpoint, an `Engine` gets wrapped."""
    from radixlm.lang.backend.engine import EngineBackend, is_engine

    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: call sgl.set_default_backend(...) or pass backend=... to run()")
    if hasattr(backend, "endpoint"):
        backend = backend.endpoint
    if is_engine(backend):
        backend = EngineBackend(backend)
    if not isinstance(backend, BaseBackend):
        raise TypeError(f"not a backend: {backend!r} (use RuntimeEndpoint, Runtime, Engine or OpenAI)")
    return backend


_RUN_SAMPLING_ARGS = ("max_new_tokens", "n", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p",
                      "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
                      "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


def _sampling_defaults(run_args: dict[str, Any]) -> SglSamplingParams:
    """Run-level sampling defaults from run()/run_batch()'s own arguments (their locals())."""
    kw = {k: run_args[k] for k in _RUN_SAMPLING_ARGS}
    for key in ("stop", "stop_token_ids", "stop_regex"):
        kw[key] = kw[key] if kw[key] is not None else ()
    return SglSamplingParams(**kw)


class SglFunction:
    def __init__(self, func: Callable, num_api_spec_tokens: int | None = None,
                 bind_arguments: dict[str, Any] | None = None) -> None:
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        params = list(inspect.signature(func).parameters)
        if not params or params[0] != "s":
            raise TypeError(f"@function {func.__name__}: the first parameter must be named 's'")
        self.arg_names = params[1:]
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def __repr__(self) -> str:
        return f"SglFunction({self.__name__})"

    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise TypeError(f"{self.__name__}.bind(): unknown arguments {unknown}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def run(self, *args: Any, max_new_tokens: int = 128, n: int = 1, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, stop_regex: str | list[str] | None = None,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
            frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
            return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
            stream: bool = False, backend: Any = None, use_thread: bool = True, **kwargs: Any) -> ProgramState:
        defaults = _sampling_defaults(locals())
        return run_program(self, resolve_backend(backend), args, kwargs, defaults, stream, use_thread=use_thread)

    def run_batch(self, batch_kwargs: list[dict[str, Any]] | list[tuple], *, max_new_tokens: int = 128, n: int = 1,
                  stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                  stop_regex: str | list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                  ignore_eos: bool = False, return_logprob: bool | None = None, logprob_start_len: int | None = None,
                  top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
                  backend: Any = None, num_threads: int | str = "auto", progress_bar: bool = False,
                  generator_style: bool = False) -> Any:
        defaults = _sampling_defaults(locals())
        batch = [self._as_kwargs(item) for item in batch_kwargs]
        return run_program_batch(self, resolve_backend(backend), batch, defaults, num_threads, progress_bar,
                                 generator_style)

    def _as_kwargs(self, item: Any) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        if isinstance(item, (list, tuple)):
            free = [a for a in self.arg_names if a not in self.bind_arguments]
            if len(item) != len(free):
                raise ValueError(f"{self.__name__}: {len(item)} positional values for arguments {free}")
            return dict(zip(free, item))
        raise TypeError(f"run_batch items must be dicts or tuples, got {type(item).__name__}")

    def trace(self, *, backend: Any = None, **kwargs: Any) -> Any:
        from radixlm.lang.tracer import trace_program

        return trace_program(self, kwargs, resolve_backend(backend) if (backend or global_config.default_backend) else None)

    def cache(self, backend: Any = None) -> str | None:
        return cache_program(self, resolve_backend(backend))

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


def _run_body(state: ProgramState, program: SglFunction, args: tuple, kwargs: dict[str, Any]) -> None:
    executor = state.stream_executor
    try:
        state.ret_value = program.func(state, *args, **kwargs)
    except BaseException as exc:
        if executor.error_ is None:
            executor.error_ = exc
        raise
    finally:
        executor.end()
    if global_config.verbosity >= 2:
        print(state.text())


def run_program(program: SglFunction, backend: BaseBackend, args: tuple, kwargs: dict[str, Any],
                defaults: SglSamplingParams, stream: bool, use_thread: bool = True) -> ProgramState:
    kwargs = {**program.bind_arguments, **kwargs}
    executor = StreamExecutor(backend, kwargs, defaults, None, stream, program.num_api_spec_tokens, use_thread)
    state = ProgramState(executor)
    if stream:
        def body() -> None:
            try:
                _run_body(state, program, args, kwargs)
            except BaseException:  # noqa: BLE001 - kept in state.error() for the reader
                pass

        threading.Thread(target=body, name=f"sgl-stream-{program.__name__}", daemon=True).start()
    else:
        _run_body(state, program, args, kwargs)
    return state


def _auto_threads(batch_size: int) -> int:
    return max(1, min(batch_size, max(96, 16 * (os.cpu_count() or 1))))


def run_program_batch(program: SglFunction, backend: BaseBackend, batch: list[dict[str, Any]],
                      defaults: SglSamplingParams, num_threads: int | str = "auto", progress_bar: bool = False,
                      generator_style: bool = False) -> Any:
    if len(batch) > 1 and global_config.enable_precache_with_tracing:
        cache_program(program, backend)
    threads = _auto_threads(len(batch)) if num_threads == "auto" else max(1, int(num_threads))
    run_one = lambda kw: run_program(program, backend, (), kw, defaults, False)  # noqa: E731
    if generator_style:
        return _run_chunks(run_one, batch, threads, progress_bar)
    return list(_run_chunks(run_one, batch, threads, progress_bar, chunk=max(len(batch), 1)))


def _run_chunks(run_one: Callable[[dict], ProgramState], batch: list[dict[str, Any]], threads: int,
                progress_bar: bool, chunk: int = 200) -> Iterator[ProgramState]:
    """Results in submission order; each chunk runs on the pool before the next is submitted."""
    bar = None
    if progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(batch))
    try:
        if threads == 1:
            for kw in batch:
                state = run_one(kw)
                if bar is not None:
                    bar.update(1)
                yield state
            return
        with ThreadPoolExecutor(threads) as pool:
            for lo in range(0, len(batch), chunk):
                futures = [pool.submit(run_one, kw) for kw in batch[lo:lo + chunk]]
                if bar is not None:
                    for f in futures:
                        f.add_done_callback(lambda _f: bar.update(1))
                for f in futures:
                    yield f.result()
    finally:
        if bar is not None:
            bar.close()


def cache_program(program: SglFunction, backend: BaseBackend) -> str | None:
    """Prefill the program's constant prefix once (when long enough to be worth a request)."""
    from radixlm.lang.tracer import extract_prefix_by_tracing

    prefix = extract_prefix_by_tracing(program, backend)
    if prefix and len(prefix) > global_config.precache_min_chars:
        backend.cache_prefix(prefix)
        return prefix
    return None


def function(func: Callable | None = None, *, num_api_spec_tokens: int | None = None) -> Any:
    """`@function` and `@function(num_api_spec_tokens=N)` both work."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
