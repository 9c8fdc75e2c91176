"""`radixlm.Engine`: the offline API. The scheduler runs in its own process, exactly as behind the
HTTP server; this object is the tokenizer side, on a private event loop thread."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from radixlm.runtime.generate_request import GenerateRequest, build_generate_request
from radixlm.runtime.native_output import native_output
from radixlm.runtime.sequence_output import SequenceDelta, SequenceResult
from radixlm.runtime.served_name import served_model_name
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer_manager import TokenizerManager


class Engine:
    def __init__(self, model_path: str | None = None, **options: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **options).resolve()  # every option checked here
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="radixlm-engine-loop", daemon=True)
        self._thread.start()
        self.tokenizer_manager = TokenizerManager(self.server_args)
        self.tokenizer_manager.start(self._loop)
        self.tokenizer = self.tokenizer_manager.tokenizer
        self.model_path = str(self.tokenizer_manager.model_dir)
        self.served_model_name = served_model_name(model_path, self.server_args.served_model_name)
        self._closed = False

    # ---------------------------------------------------------------- generation
    def _request(self, prompt: Any, sampling_params: Any, input_ids: Any, return_logprob: Any,
                 logprob_start_len: Any, top_logprobs_num: Any, stream: bool, extra: dict[str, Any]) -> GenerateRequest:
        """The HTTP server's request builder, on these arguments; `extra`: /generate's other fields
        (rid, return_text_in_logprobs, extra_key, ...), None meaning not given."""
        given = {k: v for k, v in extra.items() if v is not None}
        text = given.pop("text", prompt)
        return build_generate_request(
            self.tokenizer_manager.info.vocab_size, text=text, input_ids=input_ids, sampling_params=sampling_params,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            stream=stream, **given)

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        stream: bool = False,
        **extra: Any,
    ) -> Any:
        """SGLang-shaped result dict (a list for batches or n > 1); an iterator of them when streaming."""
        req = self._request(prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
                            stream, extra)
        if stream:
            return self._stream_sync(req)
        fut = asyncio.run_coroutine_threadsafe(self._collect(req), self._loop)
        return fut.result()

    async def _collect(self, req: GenerateRequest) -> Any:
        async for update in self.tokenizer_manager.generate(req):  # (not streaming: one update, every sequence whole)
            outputs = [native_output(SequenceResult(d.index).add(d)) for d in update]
            return outputs if req.is_batch or len(outputs) > 1 else outputs[0]

    def _stream_sync(self, req: GenerateRequest) -> Iterator[Any]:
        agen = self.tokenizer_manager.generate(req)
        render = _NativeStream()
        try:
            while True:
                try:
                    update = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
                except StopAsyncIteration:
                    return
                for d in update:
                    yield render(d)
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        stream: bool = False,
        **extra: Any,
    ) -> Any:
        req = self._request(prompt, sampling_params, input_ids, return_logprob, logprob_start_len, top_logprobs_num,
                            stream, extra)
        if stream:
            return self._stream_async(req)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._collect(req), self._loop))

    async def _stream_async(self, req: GenerateRequest) -> AsyncIterator[Any]:
        agen = self.tokenizer_manager.generate(req)
        render = _NativeStream()
        try:
            while True:
                fut = asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop)
                try:
                    update = await asyncio.wrap_future(fut)
                except StopAsyncIteration:
                    return
                for d in update:
                    yield render(d)
        finally:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop))

    # ---------------------------------------------------------------- control
    def _control(self, kind: str) -> Any:
        return asyncio.run_coroutine_threadsafe(self.tokenizer_manager.control(kind), self._loop).result()

    def get_server_info(self) -> dict[str, Any]:
        return self._control("get_info").payload

    def flush_cache(self) -> bool:
        return self._control("flush_cache").ok

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> dict[str, Any]:
        """SGLang's Engine.load_lora_adapter: {"success", "error_message", "loaded_adapters"}."""
        coro = self.tokenizer_manager.load_lora_adapter(lora_name, lora_path)
        return _lora_result(asyncio.run_coroutine_threadsafe(coro, self._loop).result())

    def unload_lora_adapter(self, lora_name: str) -> dict[str, Any]:
        """Refused (success False, saying why) while requests use the adapter."""
        coro = self.tokenizer_manager.unload_lora_adapter(lora_name)
        return _lora_result(asyncio.run_coroutine_threadsafe(coro, self._loop).result())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.tokenizer_manager.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


def _lora_result(resp: Any) -> dict[str, Any]:
    return {"success": resp.ok, "error_message": None if resp.ok else resp.payload.get("message"),
            "loaded_adapters": resp.payload.get("loaded_adapters", {})}


class _NativeStream:
    """A stream's deltas as SGLang's native stream events: each sequence's whole output so far."""

    def __init__(self) -> None:
        self.results: dict[int, SequenceResult] = {}

    def __call__(self, d: SequenceDelta) -> dict[str, Any]:
        return native_output(self.results.setdefault(d.index, SequenceResult(d.index)).add(d))
