"""Verification: which proposed tokens a request keeps, and the token after them.

At each position of a verify row the target's token is drawn exactly as a decode step would draw
it there (same adjusted distribution, same seeded draw: step = tokens generated before it), given
that the drafts before it were accepted. A draft is accepted while it equals that token; the first
target token that differs (or the one after the last draft) is the bonus token. For a drafter
that proposes tokens deterministically (NGRAM; draft models draft greedily) this is standard
rejection sampling: the draft d is accepted with probability p(d) = min(1, p(d) / q(d)) for
q = one-hot(d), and on rejection the token is distributed as p without d, renormalized, i.e. the
residual max(p - q, 0). The seeded exponential race realises both draws at once, so a seeded
request emits the very tokens it emits with speculation off, greedy or sampled.
"""
from __future__ import annotations

from collections.abc import Collection

from radixlm.runtime.request import Req
from radixlm.runtime.sampler import SampleRow


def position_rows(reqs: list[Req], drafts: list[list[int]], eos_ids: Collection[int]) -> list[SampleRow]:
    """One SampleRow per verified position: position j of a request sees its output plus the first j
    drafts (penalties, min_new_tokens) and draws with step len(output) + j."""
    rows = []
    for req, draft in zip(reqs, drafts):
        p = req.params
        banned_ids = tuple(set(eos_ids) | set(p.stop_token_ids))
        n_out = len(req.output_ids)
        for j in range(len(draft) + 1):
            history = req.output_ids + draft[:j] if p.needs_output_history else req.output_ids
            rows.append(SampleRow(params=p, seed=req.seed, step=n_out + j, output_ids=history,
                                  prompt_ids=req.input_ids, banned_ids=banned_ids if n_out + j < p.min_new_tokens else ()))
    return rows


def accepted_run(draft: list[int], targets: list[int]) -> list[int]:
    """The tokens a verify row emits: the drafts equal to the target's token at their position, then
    the target's token at the first position that differs (or after the last draft)."""
    out = []
    for j, tok in enumerate(targets):
        out.append(tok)
        if j == len(draft) or tok != draft[j]:
            break
    return out
