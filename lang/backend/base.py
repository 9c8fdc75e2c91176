"""The backend interface the interpreter drives; SGLang's BaseBackend hooks, with no-op defaults."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from radixlm.lang.chat_template import ChatTemplate, get_chat_template
from radixlm.lang.ir import ChoicesDecision, SglSamplingParams

if TYPE_CHECKING:
    from radixlm.lang.interpreter import StreamExecutor


class BackendError(RuntimeError):
    """The backend answered, but refused or failed the request (HTTP status and server message)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BackendUnreachableError(ConnectionError):
    """No answer at all: the server is not running, or the address is wrong."""


class BaseBackend:
    supports_images: bool = False
    # KV splicing for join(mode="concate_and_append"); SGLang's server never had the route.
    support_concate_and_append: bool = False

    def __init__(self) -> None:
        self.chat_template: ChatTemplate = get_chat_template("default")

    def get_model_name(self) -> str:
        raise NotImplementedError

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    # Prefix caching and program lifecycle: optional.
    def cache_prefix(self, prefix_str: str) -> None:
        pass

    def uncache_prefix(self, rid: str) -> None:
        pass

    def end_request(self, rid: str | list[str]) -> None:
        pass

    def begin_program(self, s: "StreamExecutor") -> None:
        pass

    def end_program(self, s: "StreamExecutor | list[StreamExecutor]") -> None:
        pass

    def commit_lazy_operations(self, s: "StreamExecutor") -> None:
        pass

    def fork_program(self, src: "StreamExecutor", dst: list["StreamExecutor"], position_ids_offset: Any = None) -> None:
        pass

    def fill_image(self, s: "StreamExecutor") -> None:
        pass

    # Generation: required.
    def generate(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> tuple[Any, Any]:
        raise NotImplementedError

    def generate_stream(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        raise NotImplementedError

    def select(self, s: "StreamExecutor", choices: list[str], temperature: float,
               choices_method: Callable[..., ChoicesDecision]) -> ChoicesDecision:
        raise NotImplementedError

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot splice KV caches")

    def shutdown(self) -> None:
        pass

    def flush_cache(self) -> Any:
        pass

    def get_server_info(self) -> Any:
        pass
