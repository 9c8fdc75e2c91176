"""Messages between the tokenizer/HTTP process and the scheduler process (pickled over a pipe)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.top_rows import TopRows


@dataclass(frozen=True)
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: output logprobs only
    top_logprobs_num: int = 0
    stream: bool = False
    extra_key: str | None = None  # radix cache namespace (cache_salt)
    lora_path: str | None = None  # the LoRA adapter's name (SGLang's field name); None: the base model


def sequence_rids(rid: str, n: int) -> list[str]:
    """The ids of a request's n sequences: its own rid when n == 1, else "<rid>-0" ... "<rid>-{n-1}".
    The front and the scheduler both name sequences with this, and nothing else."""
    return [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]


@dataclass(frozen=True)
class FinishReason:
    """Why a sequence ended. stop: an EOS / stop token id, a stop string or the grammar's end
    (`matched`: the id or string, None for the grammar); length: `max_new_tokens` or the context
    (`length`: tokens generated); abort: `message`, with `status_code` when the request itself was
    at fault (400: its grammar does not compile), else a server-side abort. `regex`: `matched` is
    the text a stop_regex matched (the front trims at the regex, not at that text)."""

    kind: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    length: int = 0
    message: str = ""
    status_code: int | None = None
    regex: bool = False

    @classmethod
    def stop(cls, matched: int | str | None, regex: bool = False) -> "FinishReason":
        return cls("stop", matched=matched, regex=regex)

    @classmethod
    def of_length(cls, length: int) -> "FinishReason":
        return cls("length", length=length)

    @classmethod
    def abort(cls, message: str, status_code: int | None = None) -> "FinishReason":
        return cls("abort", message=message, status_code=status_code)

    def to_json(self) -> dict[str, Any]:
        """SGLang's public `finish_reason` object."""
        if self.kind == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.kind == "length":
            return {"type": "length", "length": self.length}
        return {"type": "abort", "message": self.message}


@dataclass(frozen=True)
class AbortReq:
    rid: str
    message: str = "aborted by client"


@dataclass(frozen=True)
class ControlReq:
    """flush_cache | get_info | shutdown; answered with a ControlResp of the same id."""

    kind: str
    request_id: int
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlResp:
    request_id: int
    ok: bool
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReqOutput:
    """One step's news about one request; token lists are deltas since the last ReqOutput."""

    rid: str
    output_ids: list[int]
    finished_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    # per prompt token (None, or its pairs), a prefill chunk's as one TopRows: the front expands them
    input_top_logprobs: list[list[tuple[float, int]] | TopRows | None] | None = None
    output_token_logprobs: list[tuple[float, int]] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] | None = None
    forced_tokens: int = 0
    num_retractions: int = 0
    spec_verify_ct: int | None = None  # speculative decoding: verify steps so far (None: speculation off)
    spec_accepted_tokens: int | None = None  # draft tokens accepted so far


@dataclass(frozen=True)
class SchedulerReady:
    """Sent once after the model is loaded: the limits the front process validates requests against."""

    model_path: str
    max_total_tokens: int
    max_running_requests: int
    context_len: int
    vocab_size: int
    device: str
    dtype: str
    architecture: str
    weights_bytes: int = 0  # rank 0's share of the weights
    kv_bytes: int = 0  # rank 0's KV pool
    quantization: str = "none"  # as resolved at load: none | gguf | fp8 | gptq | awq | w4a16
    kv_cache_dtype: str = "auto"  # the pool's dtype as resolved (bfloat16, float8_e4m3fn, ...)
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # empty: decode runs eagerly
    load_seconds: float = 0.0  # process start -> ready


@dataclass(frozen=True)
class SchedulerFailed:
    error: str
