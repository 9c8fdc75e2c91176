"""How `select` turns per-option token logprobs into a decision (SGLang's three choice methods).

Every method receives, per option, the logprob triples `[logprob, token_id, token_text]` of the
tokens that spell the option (the backend has already dropped the shared prefix tokens).
"""
from __future__ import annotations

from typing import Any

from radixlm.lang.ir import ChoicesDecision

Triple = list[Any]


def _values(triples: list[Triple]) -> list[float]:
    """Logprob values, with a null (no context: the very first position) counted as 0."""
    return [float(t[0]) if t[0] is not None else 0.0 for t in triples]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


def _argmax(scores: list[float]) -> int:
    """First maximum wins, so ties go to the earlier option."""
    best = 0
    for i, v in enumerate(scores):
        if v > scores[best]:
            best = i
    return best


class ChoicesSamplingMethod:
    requires_unconditional_logprobs: bool = False

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Triple]],
        output_token_logprobs: list[list[Triple]],
        unconditional_token_logprobs: list[list[Triple]] | None = None,
    ) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class TokenLengthNormalized(ChoicesSamplingMethod):
    """Highest mean token logprob: long options are not penalised for their length."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = _argmax(list(normalized_prompt_logprobs))
        return ChoicesDecision(choices[best], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
        })


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare options token by token, keeping only those tied for the best logprob at each column;
    shorter options are padded with their own mean so they neither win nor lose by running out."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        rows = [_values(t) for t in input_token_logprobs]
        width = max((len(r) for r in rows), default=0)
        matrix = [r + [_mean(r) if r else 0.0] * (width - len(r)) for r in rows]
        alive = list(range(len(choices)))
        for col in range(width):
            top = max(matrix[i][col] for i in alive)
            alive = [i for i in alive if matrix[i][col] == top]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[alive[0]], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "greedy_logprob_matrix": matrix,
        })


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """Mean of (conditional − unconditional) logprob: favours options the prompt makes *more* likely
    than they are on their own, instead of options that are merely common strings."""

    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional_token_logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            c, u = _values(cond), _values(uncond)
            u = u + [0.0] * (len(c) - len(u))
            scores.append(_mean([a - b for a, b in zip(c, u)]))
        best = _argmax(scores)
        return ChoicesDecision(choices[best], {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "unconditional_token_logprobs": unconditional_token_logprobs,
            "normalized_unconditional_prompt_logprobs": scores,
        })


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
