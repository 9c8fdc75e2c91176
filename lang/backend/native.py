"""Shared logic of the backends that speak SGLang's native /generate protocol (over HTTP or in
process): request bodies, dtype → regex, and select scored from prompt logprobs (§2.6)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable

from radixlm.lang.backend.base import BaseBackend
from radixlm.lang.global_config import global_config
from radixlm.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, ChoicesDecision, SglSamplingParams

if TYPE_CHECKING:
    from radixlm.lang.interpreter import StreamExecutor

_DTYPE_REGEX = {"int": REGEX_INT, "float": REGEX_FLOAT, "str": REGEX_STR, "bool": REGEX_BOOL}


def apply_dtype(params: SglSamplingParams) -> SglSamplingParams:
    """dtype becomes a regex; numbers also stop at the first blank, which the regex lets through."""
    if params.dtype is None:
        return params
    params = dataclasses.replace(params, regex=_DTYPE_REGEX[params.dtype], json_schema=None, ebnf=None)
    if params.dtype in ("int", "float"):
        params.add_stop([" ", "\n"])
    return params


def option_token_logprobs(entries: list[list[Any]], prefix: str, option: str, prompt_entries: int) -> list[list[Any]]:
    """The logprob triples of the tokens that spell `option` after `prefix`.

    The scored window starts two tokens before the end of the prefix, so that a token merging the
    prefix's last characters with the option's first ("token healing") is seen. Keep exactly the
    tokens that overlap the option's characters; tokens lying wholly inside the prefix are dropped.
    When token texts are missing or do not spell the option (odd byte-level pieces), fall back to
    dropping the `prompt_entries` positions that the prefix alone occupies.
    """
    texts = [e[2] for e in entries]
    if all(isinstance(t, str) for t in texts):
        joined = "".join(texts)
        if joined.endswith(option):
            start_of_option = len(joined) - len(option)
            end = 0
            for i, t in enumerate(texts):
                end += len(t)
                if end > start_of_option:
                    return entries[i:]
            return []
    return entries[prompt_entries:]


def _mean_logprob(triples: list[list[Any]]) -> float:
    values = [t[0] for t in triples if t[0] is not None]
    return sum(values) / len(values) if values else float("-inf")


class NativeBackend(BaseBackend):
    """Subclasses move bodies: `_post_generate(body)` and `_post_generate_stream(body)`."""

    def _post_generate(self, body: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _post_generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ requests
    def _generate_body(self, s: "StreamExecutor", params: SglSamplingParams) -> dict[str, Any]:
        self._check_images(s)
        params = apply_dtype(params)
        sampling = {
            "skip_special_tokens": global_config.skip_special_tokens_in_output,
            "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
            **params.to_srt_kwargs(),
        }
        return {"text": s.text_, "sampling_params": sampling, **params.logprob_kwargs()}

    def _check_images(self, s: "StreamExecutor") -> None:
        if getattr(s, "images_", None):
            raise NotImplementedError(f"{type(self).__name__}: image inputs are not supported (text-only models)")

    def _prefill(self, text: str) -> dict[str, Any]:
        """A prefill-only request: puts `text` in the server's radix cache, generates nothing."""
        return self._post_generate({"text": text, "sampling_params": {"max_new_tokens": 0}})

    def cache_prefix(self, prefix_str: str) -> None:
        self._prefill(prefix_str)

    def commit_lazy_operations(self, s: "StreamExecutor") -> None:
        if s.text_:
            self._prefill(s.text_)

    def generate(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> tuple[Any, Any]:
        out = self._post_generate(self._generate_body(s, sampling_params))
        if isinstance(out, list):  # n > 1
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, s: "StreamExecutor", sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        if sampling_params.n != 1:
            raise ValueError("streaming supports n=1 only")
        body = self._generate_body(s, sampling_params)
        body["stream"] = True
        cursor = 0
        for event in self._post_generate_stream(body):
            text = event["text"]  # cumulative, as SGLang's default streaming mode sends it
            yield text[cursor:], event["meta_info"]
            cursor = len(text)

    # ------------------------------------------------------------------------------ select
    def select(self, s: "StreamExecutor", choices: list[str], temperature: float,
               choices_method: Callable[..., ChoicesDecision]) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError(f"select on {type(self).__name__} scores options greedily; temperature must be 0, got {temperature}")
        self._check_images(s)
        prefix = s.text_
        # (a) prefix once: fills the cache so the options below share it, and gives its length.
        prompt_len = self._prefill(prefix)["meta_info"]["prompt_tokens"] if prefix else 0
        start = max(prompt_len - 2, 0)
        # (b) every option in one batched request, scored from the prompt logprobs.
        outs = self._post_generate({
            "text": [prefix + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": start,
        })
        input_token_logprobs = [
            option_token_logprobs(o["meta_info"]["input_token_logprobs"], prefix, c, prompt_len - start)
            for o, c in zip(outs, choices)
        ]
        output_token_logprobs = [o["meta_info"].get("output_token_logprobs", []) for o in outs]
        normalized = [_mean_logprob(t) for t in input_token_logprobs]
        unconditional = None
        if getattr(choices_method, "requires_unconditional_logprobs", False):
            unconditional = self._unconditional_logprobs(input_token_logprobs)
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=output_token_logprobs,
            unconditional_token_logprobs=unconditional,
        )

    def _unconditional_logprobs(self, option_triples: list[list[list[Any]]]) -> list[list[list[Any]]]:
        """(c) each option's tokens scored on their own, with no prompt."""
        ids = [[t[1] for t in triples] for triples in option_triples]
        present = [i for i, x in enumerate(ids) if x]
        result: list[list[list[Any]]] = [[] for _ in ids]
        if not present:
            return result
        outs = self._post_generate({
            "input_ids": [ids[i] for i in present],
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,  # our server's default (-1) would score only the last token
        })
        for i, o in zip(present, outs):
            result[i] = o["meta_info"]["input_token_logprobs"]
        return result
