"""What the front process hands its callers about one sequence: typed deltas, and their sum.

The TokenizerManager turns the scheduler's `ReqOutput`s into one `SequenceDelta` per sequence and
update (new visible text, new token ids, new logprobs, the `FinishReason` once finished). Each
edge sums them in a `SequenceResult` and renders that in its own shape: the native API and the
`Engine` as SGLang's /generate dict (`native_output.py`), the OpenAI API as choices and chunks.
Nothing between the detokenizer and those renderers reads a JSON dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from radixlm.runtime.io_struct import FinishReason


class TokenLogprob(NamedTuple):
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    token_id: int
    text: str | None  # the token's text, when the request asked for it (return_text_in_logprobs)


TopLogprobs = list[TokenLogprob]


@dataclass(frozen=True)
class LogprobDelta:
    """New logprob entries of a sequence that asked for them; the top lists only with top_logprobs_num > 0."""

    input_tokens: list[TokenLogprob]
    output_tokens: list[TokenLogprob]
    input_top: list[TopLogprobs | None] | None = None
    output_top: list[TopLogprobs] | None = None


@dataclass(frozen=True)
class SequenceDelta:
    """One sequence's news since its previous delta. The visible text is never a partial UTF-8
    character and never a stop string or what could still grow into one: text held back while
    streaming. `text` replaces the visible text from `text_start` on, which is its previous length
    except when the finish trims held-back text differently (a stop token's text, a stop regex)."""

    index: int  # position among the request's outputs: prompt-major, then its n samples
    rid: str
    text: str
    text_start: int
    output_ids: list[int]
    prompt_tokens: int
    completion_tokens: int  # counts so far, not deltas
    cached_tokens: int
    forced_tokens: int = 0  # tokens placed by jump-forward, not sampled
    num_retractions: int = 0
    spec_verify_ct: int | None = None  # speculative decoding: verify steps so far (None: off)
    spec_accepted_tokens: int | None = None  # draft tokens accepted so far
    logprobs: LogprobDelta | None = None  # None: not asked for
    finish: FinishReason | None = None
    e2e_latency: float | None = None  # seconds from submit to the finish

    @property
    def failed_status(self) -> int | None:
        """The HTTP status of a sequence the scheduler failed for the request's own fault (400: its
        grammar does not compile), or None."""
        return self.finish.status_code if self.finish is not None and self.finish.status_code else None


@dataclass
class SequenceResult:
    """A sequence so far: the sum of its deltas."""

    index: int
    rid: str = ""
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    forced_tokens: int = 0
    num_retractions: int = 0
    spec_verify_ct: int | None = None
    spec_accepted_tokens: int | None = None
    logprobs: LogprobDelta | None = None  # every entry so far (same type: the sum of the deltas)
    finish: FinishReason | None = None
    e2e_latency: float | None = None

    def add(self, d: SequenceDelta) -> SequenceResult:
        self.rid = d.rid
        self.text = self.text[: d.text_start] + d.text
        self.output_ids.extend(d.output_ids)
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = d.prompt_tokens, d.completion_tokens, d.cached_tokens
        self.forced_tokens, self.num_retractions = d.forced_tokens, d.num_retractions
        self.spec_verify_ct, self.spec_accepted_tokens = d.spec_verify_ct, d.spec_accepted_tokens
        if d.logprobs is not None:
            self.logprobs = _sum(self.logprobs, d.logprobs)
        self.finish, self.e2e_latency = d.finish, d.e2e_latency
        return self


def _sum(a: LogprobDelta | None, b: LogprobDelta) -> LogprobDelta:
    if a is None:
        return LogprobDelta(list(b.input_tokens), list(b.output_tokens),
                            None if b.input_top is None else list(b.input_top),
                            None if b.output_top is None else list(b.output_top))
    a.input_tokens.extend(b.input_tokens)
    a.output_tokens.extend(b.output_tokens)
    if a.input_top is not None and b.input_top is not None:
        a.input_top.extend(b.input_top)
    if a.output_top is not None and b.output_top is not None:
        a.output_top.extend(b.output_top)
    return a


def common_prefix_len(a: str, b: str) -> int:
    """Characters `b` keeps of `a`: where a text delta from `a` to `b` starts."""
    if b.startswith(a):  # the usual case: the text grew
        return len(a)
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k
