"""`EngineBackend`: run programs against an in-process `radixlm.Engine`, no HTTP server needed.
The engine takes the same /generate bodies, so all request logic is shared with RuntimeEndpoint."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from radixlm.lang.backend.native import NativeBackend
from radixlm.lang.chat_template import get_chat_template, get_chat_template_for_server

_ENGINE_ARGS = ("text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                "top_logprobs_num", "stream")


def is_engine(obj: Any) -> bool:
    """Without importing the runtime (and torch) when no Engine was ever created."""
    module = sys.modules.get("radixlm.runtime.engine")
    return module is not None and isinstance(obj, module.Engine)


class EngineBackend(NativeBackend):
    def __init__(self, engine: Any, chat_template_name: str | None = None) -> None:
        super().__init__()
        self.engine = engine
        if chat_template_name:
            self.chat_template = get_chat_template(chat_template_name)
        else:
            self.chat_template = get_chat_template_for_server({
                "served_model_name": getattr(engine, "served_model_name", None), "model_path": str(engine.model_path),
                "chat_template": getattr(engine.tokenizer, "chat_template", None)})

    def __repr__(self) -> str:
        return f"EngineBackend({self.engine.model_path!r})"

    def get_model_name(self) -> str:
        return str(self.engine.model_path)

    def _call(self, body: dict[str, Any], stream: bool) -> Any:
        extra = {k: v for k, v in body.items() if k not in _ENGINE_ARGS}
        return self.engine.generate(
            prompt=body.get("text"),
            sampling_params=body.get("sampling_params"),
            input_ids=body.get("input_ids"),
            return_logprob=body.get("return_logprob", False),
            logprob_start_len=body.get("logprob_start_len"),
            top_logprobs_num=body.get("top_logprobs_num"),
            stream=stream,
            **extra,
        )

    def _post_generate(self, body: dict[str, Any]) -> Any:
        return self._call(body, stream=False)

    def _post_generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self._call({k: v for k, v in body.items() if k != "stream"}, stream=True)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        self.engine.shutdown()
