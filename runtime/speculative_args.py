"""The speculative-decoding options of ServerArgs (group "speculative"), their checks and derived sizes.

A part of ServerArgs, which inherits it: `server_args.py` keeps the list of every option and `resolve`.
"""
from __future__ import annotations

from dataclasses import dataclass

from radixlm.runtime.flag_spec import option

SPEC_ALGORITHMS = ("NGRAM", "STANDALONE", "EAGLE3")


@dataclass(frozen=True, kw_only=True)
class SpeculativeArgs:
    speculative_algorithm: str | None = option(
        None, "speculative", "propose tokens cheaply, verify them all in one target pass (greedy output "
        "unchanged, sampling exact); NGRAM: prompt lookup over the request's prompt and output, no extra model; "
        "STANDALONE: a small draft model; EAGLE3: an EAGLE-3 draft head on the target's hidden states",
        str, choices=SPEC_ALGORITHMS, default_text="off")
    speculative_draft_model_path: str | None = option(
        None, "speculative", "STANDALONE: a smaller model of the same families and tokenizer (folder, .gguf or hub "
        "id) that drafts greedily from its own KV pool; EAGLE3: an EAGLE-3 head folder (speculators' layout, or the "
        "original release's) trained for the target", str, default_text="none")
    speculative_num_steps: int | None = option(
        None, "speculative", "draft depth: at most this many tokens proposed per request and step (fewer "
        "while acceptance is too low to pay)", int, minimum=1, default_text="4 with an algorithm")
    speculative_num_draft_tokens: int | None = option(
        None, "speculative", "tokens verified per request and step, the last sampled one included "
        "(chains: num_steps + 1; trees: their nodes + 1)", int, minimum=2,
        default_text="num_steps + 1 (trees: num_steps x topk + 1)")
    speculative_eagle_topk: int | None = option(
        None, "speculative", "branching per draft step: 1 drafts a chain; above 1 (NGRAM only) a token tree of "
        "up to this many children per node, the continuations of several earlier occurrences, verified in "
        "one pass (speculative-num-draft-tokens bounds its size)", int, minimum=1, default_text="1")
    speculative_adaptive: str = option(
        "on", "speculative", "on: the draft depth per batch size is chosen from measured speed "
        "(runtime/speculative/draft_payoff.py), so drafting turns itself off where it does not pay; off: every "
        "decode step may draft up to --speculative-num-steps (the per-request draft budget alone decides)",
        str, choices=("on", "off"))
    disable_speculative_ahead: bool = option(
        False, "speculative", "NGRAM chains: launch each verify step only once the previous one's results are "
        "processed (default: with the overlap schedule, the next verify step is built while the previous one "
        "runs, guessing that all its drafts are accepted, and launched at once where the guess holds)", bool)

    def _check_speculative(self, ranks: int) -> None:
        """`ranks`: tp_size x pp_size."""
        given = [name for name in ("speculative_num_steps", "speculative_num_draft_tokens", "speculative_eagle_topk",
                                   "speculative_draft_model_path") if getattr(self, name) is not None]
        if self.speculative_algorithm is None:
            if given:
                raise ValueError(f"{given[0]}: needs --speculative-algorithm")
            return
        with_model = self.speculative_algorithm in ("STANDALONE", "EAGLE3")
        if with_model != (self.speculative_draft_model_path is not None):
            raise ValueError("speculative_draft_model_path: required with STANDALONE and EAGLE3, and only with them")
        if with_model and ranks > 1:
            raise ValueError(f"speculative_algorithm: {self.speculative_algorithm} runs on one rank "
                             "(tp_size = pp_size = 1) for now")
        steps, tokens = self.speculative_num_steps, self.speculative_num_draft_tokens
        if self.speculative_topk > 1:
            if self.speculative_algorithm != "NGRAM":
                raise ValueError(f"speculative_eagle_topk: trees are implemented for NGRAM only, not "
                                 f"{self.speculative_algorithm} (use 1)")
            if ranks > 1:
                raise ValueError("speculative_eagle_topk: draft trees run on one rank (tp_size = pp_size = 1) for now")
            return  # a tree: num_draft_tokens bounds its nodes, num_steps its depth
        if steps is not None and tokens is not None and tokens != steps + 1:
            raise ValueError(f"speculative_num_draft_tokens: {tokens} is not speculative_num_steps + 1 = {steps + 1} "
                             "(chains verify the drafts plus the last sampled token)")

    @property
    def speculative_topk(self) -> int:
        """Children per draft-tree node at most (1: chains)."""
        return self.speculative_eagle_topk or 1

    @property
    def speculative_tree_nodes(self) -> int:
        """Draft-tree nodes per request and step at most (the tokens verified minus the last sampled one)."""
        if self.speculative_num_draft_tokens is not None:
            return self.speculative_num_draft_tokens - 1
        return self.speculative_max_drafts * self.speculative_topk

    @property
    def speculative_max_drafts(self) -> int:
        """Draft tokens proposed per request and step at most (0: speculation off)."""
        if self.speculative_algorithm is None:
            return 0
        if self.speculative_num_steps is not None:
            return self.speculative_num_steps
        if self.speculative_num_draft_tokens is not None and self.speculative_topk == 1:
            return self.speculative_num_draft_tokens - 1  # a chain's depth; a tree's node budget is not its depth
        return 4
