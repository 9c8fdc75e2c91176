"""`OpenAI`: any OpenAI-compatible server (OpenAI itself, radixlm's /v1, SGLang, vLLM, ...).

The `openai` package is imported only when this backend is constructed. Structured output uses
`response_format` (JSON schema, standard) or SGLang's `regex` / `ebnf` request extras when the server
is known to accept them; anything the server cannot do is refused before a request is sent.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from radixlm.lang.backend.base import BaseBackend
from radixlm.lang.backend.native import apply_dtype
from radixlm.lang.chat_template import get_chat_template, get_chat_template_by_model_path
from radixlm.lang.ir import ANY_JSON, ChoicesDecision, SglSamplingParams

if TYPE_CHECKING:
    from radixlm.lang.interpreter import StreamExecutor

_EXTRA_OWNERS = ("sglang", "radixlm")  # `owned_by` of servers that take regex/ebnf/top_k extras


@dataclass
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def reset(self) -> None:
        self.prompt_tokens = self.completion_tokens = 0


class OpenAI(BaseBackend):
    def __init__(self, model_name: str, is_chat_model: bool | None = None, chat_template: Any = None,
                 is_azure: bool = False, *args: Any, structured_extras: bool | None = None,
                 max_api_retries: int = 3, **kwargs: Any) -> None:
        super().__init__()
        try:
            import openai
        except ImportError as exc:
            raise ImportError("the OpenAI backend needs the `openai` package: pip install openai") from exc
        self._openai = openai
        self.client = openai.AzureOpenAI(*args, **kwargs) if is_azure else openai.OpenAI(*args, **kwargs)
        self.model_name = model_name
        self.is_chat_model = is_chat_model if is_chat_model is not None else model_name != "gpt-3.5-turbo-instruct"
        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        self.chat_template = chat_template or get_chat_template_by_model_path(model_name)
        self._structured_extras = structured_extras  # None: ask the server once, when first needed
        self.max_api_retries = max_api_retries
        self.token_usage = TokenUsage()

    def __repr__(self) -> str:
        return f"OpenAI({self.model_name!r}, base_url={str(self.client.base_url)!r})"

    def get_model_name(self) -> str:
        return self.model_name

    # ------------------------------------------------------------------------------ capabilities
    def supports_structured_extras(self) -> bool:
        """True when the server takes SGLang's request extras (regex, ebnf, top_k, ...)."""
        if self._structured_extras is None:
            try:
                owners = {getattr(m, "owned_by", None) for m in self.client.models.list()}
                self._structured_extras = bool(owners & set(_EXTRA_OWNERS))
            except Exception:  # noqa: BLE001 - a server without /models is simply not one of ours
                self._structured_extras = False
        return self._structured_extras

    def _request_kwargs(self, params: SglSamplingParams) -> dict[str, Any]:
        """Standard OpenAI fields, plus extras and constraints; refuses what the server cannot do."""
        if params.dtype is not None or params.regex is not None or params.ebnf is not None:
            what = f"dtype={params.dtype}" if params.dtype else ("regex" if params.regex is not None else "ebnf")
            if not self.supports_structured_extras():
                raise ValueError(f"{what} needs regex-constrained decoding, which the server at "
                                 f"{self.client.base_url} does not offer through the OpenAI API "
                                 "(pass structured_extras=True if it accepts SGLang's `regex`/`ebnf` fields)")
        params = apply_dtype(params)
        kw: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
        }
        if params.stop_list():
            kw["stop"] = params.stop_list()
        extra: dict[str, Any] = {}
        if params.json_schema == ANY_JSON:
            # SGLang's "any JSON": its own servers take it as is; elsewhere the closest standard is json_object.
            if self.supports_structured_extras():
                extra["json_schema"] = ANY_JSON
            else:
                kw["response_format"] = {"type": "json_object"}
        elif params.json_schema is not None:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": json.loads(params.json_schema)}}
        if params.regex is not None:
            extra["regex"] = params.regex
        if params.ebnf is not None:
            extra["ebnf"] = params.ebnf
        wanted = {"top_k": (params.top_k, -1), "min_p": (params.min_p, 0.0), "min_tokens": (params.min_new_tokens, 0),
                  "stop_token_ids": (list(params.stop_token_ids), []), "ignore_eos": (params.ignore_eos, False)}
        set_extras = {k: v for k, (v, default) in wanted.items() if v != default}
        if set_extras and self.supports_structured_extras():  # other servers reject unknown fields
            extra.update(set_extras)
        if extra:
            kw["extra_body"] = extra
        return kw

    # ------------------------------------------------------------------------------ calls
    def _call(self, fn: Callable[..., Any], **kw: Any) -> Any:
        openai = self._openai
        retryable = (openai.RateLimitError, openai.InternalServerError)
        for attempt in range(self.max_api_retries):
            try:
                return fn(model=self.model_name, **kw)
            except retryable:
                if attempt == self.max_api_retries - 1:
                    raise
                time.sleep(5)
        raise AssertionError("unreachable")

    def _prompt(self, s: "StreamExecutor") -> dict[str, Any]:
        if self.is_chat_model:
            prefix, _ = self.chat_template.get_prefix_and_suffix("assistant", s.messages_)
            if s.cur_role != "assistant" or not s.text_.endswith(prefix):
                raise RuntimeError("on an OpenAI chat model, a gen must come right after the assistant role "
                                   "begins (e.g. s += sgl.assistant(sgl.gen('answer')))")
            return {"messages": list(s.messages_)}
        return {"prompt": s.text_}

    def _endpoint(self) -> Callable[..., Any]:
        return self.client.chat.completions.create if self.is_chat_model else self.client.completions.create

    def _count(self, usage: Any) -> None:
        if usage is not None:
            self.token_usage.prompt_tokens += usage.prompt_tokens or 0
            self.token_usage.completion_tokens += usage.completion_tokens or 0

    def _choice_text(self, choice: Any) -> str:
        return (choice.message.content or "") if self.is_chat_model else choice.text

    def generate(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> tuple[Any, Any]:
        kw = self._request_kwargs(sampling_params)
        resp = self._call(self._endpoint(), **self._prompt(s), **kw)
        self._count(resp.usage)
        texts = [self._choice_text(c) for c in resp.choices]
        metas = [{"id": resp.id, "finish_reason": c.finish_reason,
                  "prompt_tokens": getattr(resp.usage, "prompt_tokens", None),
                  "completion_tokens": getattr(resp.usage, "completion_tokens", None)} for c in resp.choices]
        if sampling_params.n > 1:
            return texts, metas
        return texts[0], metas[0]

    def generate_stream(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        if sampling_params.n != 1:
            raise ValueError("streaming supports n=1 only")
        kw = self._request_kwargs(sampling_params)
        for chunk in self._call(self._endpoint(), **self._prompt(s), stream=True, **kw):
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            delta = (c.delta.content or "") if self.is_chat_model else (c.text or "")
            yield delta, {"id": chunk.id, "finish_reason": c.finish_reason}

    # ------------------------------------------------------------------------------ select
    def select(self, s: "StreamExecutor", choices: list[str], temperature: float,
               choices_method: Callable[..., ChoicesDecision]) -> ChoicesDecision:
        if self.is_chat_model:
            return self._select_constrained(s, choices)
        if getattr(choices_method, "requires_unconditional_logprobs", False):
            raise NotImplementedError("unconditional_likelihood_normalized is not available on the OpenAI backend")
        return self._select_scored(s, choices, choices_method)

    def _select_scored(self, s: "StreamExecutor", choices: list[str], method: Callable[..., ChoicesDecision]) -> ChoicesDecision:
        """Completion models: score prefix+option with echoed prompt logprobs, one batched request."""
        prefix = s.text_
        try:
            # max_tokens=1, not 0: many servers refuse 0; the one generated token is filtered out below.
            resp = self._call(self.client.completions.create, prompt=[prefix + c for c in choices], max_tokens=1,
                              echo=True, logprobs=0, temperature=0)
        except self._openai.BadRequestError as exc:
            raise ValueError("select on an OpenAI completion model needs `echo` with `logprobs` support: "
                             f"{exc}") from exc
        per_option: list[list[list[Any]]] = [[] for _ in choices]
        for c in resp.choices:
            lp = c.logprobs
            end = len(prefix) + len(choices[c.index])
            triples = [[v, None, t] for t, v, off in zip(lp.tokens, lp.token_logprobs, lp.text_offset)
                       if off + len(t) > len(prefix) and off < end]
            per_option[c.index] = triples
        normalized = []
        for triples in per_option:
            values = [t[0] for t in triples if t[0] is not None]
            normalized.append(sum(values) / len(values) if values else float("-inf"))
        return method(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=per_option,
                      output_token_logprobs=[[] for _ in choices], unconditional_token_logprobs=None)

    def _select_constrained(self, s: "StreamExecutor", choices: list[str]) -> ChoicesDecision:
        """Chat models expose no prompt logprobs: let the server decode greedily into one option."""
        if not self.supports_structured_extras():
            raise ValueError("select on an OpenAI chat model needs regex-constrained decoding (a radixlm or SGLang "
                             "server) or a completion model (is_chat_model=False)")
        pattern = "(" + "|".join(re.escape(c) for c in choices) + ")"
        params = SglSamplingParams(max_new_tokens=max(64, max(len(c) for c in choices)), temperature=0.0, regex=pattern)
        text, meta = self.generate(s, params)
        decision = text if text in choices else next((c for c in choices if text.startswith(c)), choices[0])
        return ChoicesDecision(decision, {"method": "constrained_decoding", "raw_text": text, **meta})
