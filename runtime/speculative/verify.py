"""Verification: which proposed tokens a request keeps, and the token after them.

At each position of a verify row the target's token is drawn exactly as a decode step would draw
it there (same adjusted distribution, same seeded draw: step = tokens generated before it), given
that the drafts before it were accepted. A draft is accepted while it equals that token; the first
target token that differs (or the one after the last draft) is the bonus token. For a drafter
that proposes tokens deterministically (NGRAM; draft models draft greedily) this is standard
rejection sampling: the draft d is accepted with probability p(d) = min(1, p(d) / q(d)) for
q = one-hot(d), and on rejection the token is distributed as p without d, renormalized, i.e. the
residual max(p - q, 0). The seeded exponential race realises both draws at once, so a seeded
request emits the very tokens it emits with speculation off, greedy or sampled. A draft tree
(draft_tree.py) is verified the same way along the path its target tokens pick.
"""
from __future__ import annotations

from collections.abc import Collection

from radixlm.runtime.request import Req
from radixlm.runtime.sampler import SampleRow
from radixlm.runtime.speculative.draft_tree import DraftTree


def position_rows(reqs: list[Req], trees: list[DraftTree], eos_ids: Collection[int],
                  logits_shape: tuple[int, str] | None = None) -> list[SampleRow]:
    """One SampleRow per verified position (the root, then each draft node): a position sees its
    output plus the drafts on its path (penalties, min_new_tokens) and draws with step len(output) +
    its depth. A chain's node j is at depth j + 1, after drafts[:j + 1]. `logits_shape` (vocab, device):
    where the repetition penalty takes the request's prompt mask (Req.prompt_mask)."""
    rows = []
    for req, tree in zip(reqs, trees):
        p = req.params
        banned_ids = tuple(set(eos_ids) | p.stop_token_set)
        mask = req.prompt_mask(*logits_shape) if logits_shape is not None else None
        n_out = len(req.output_ids)
        paths: list[list[int]] = [[]]
        for tok, parent in zip(tree.tokens, tree.parents):
            paths.append(paths[parent + 1] + [tok])
        for path in paths:
            history = req.output_ids + path if p.needs_output_history else req.output_ids
            step = n_out + len(path)
            rows.append(SampleRow(params=p, seed=req.seed, step=step, output_ids=history,
                                  prompt_ids=req.input_ids, banned_ids=banned_ids if step < p.min_new_tokens else (),
                                  prompt_mask=mask))
    return rows


def accepted_run(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a chain's verify row emits: the drafts equal to the target's token at their position,
    then the target's token at the first position that differs (or after the last draft)."""
    return DraftTree.chain(draft).accepted_path(targets)[0]
