"""A step's logprobs from its logits rows: a prompt's input tokens, each sampled row's output token, and
a verify row's accepted run, with each request's top-k. Recorded on the request (`pending_*`) or
returned per row for `ResultProcessor` to append with the tokens."""
from __future__ import annotations

import torch

from radixlm.runtime.request import Req
from radixlm.runtime.sampler import token_logprobs
from radixlm.runtime.top_rows import TopRows

# (the chosen token's logprob, the top-k (logprob, token id) pairs or None)
LogprobEntry = tuple[float, list[tuple[float, int]] | None]


def record_input_logprobs(req: Req, logits: torch.Tensor, rows: list[int], first_pos: int) -> None:
    """The prompt tokens' logprobs from `first_pos` on (the first token has none), onto the request; their
    top-k as one `TopRows` for the chunk."""
    if first_pos == 1 and req.logprob_start_len == 0 and not req.pending_input_logprobs:
        req.pending_input_logprobs.append((None, req.input_ids[0]))
        req.pending_input_top.append(None)
    targets = torch.tensor(req.input_ids[first_pos : first_pos + len(rows)], device=logits.device)
    chosen, top_vals, top_ids = token_logprobs(logits[rows], targets, req.top_logprobs_num)
    req.pending_input_logprobs.extend(zip(chosen.tolist(), targets.tolist()))
    if top_vals is not None and top_ids is not None:  # the front makes the lists (top_rows.py)
        req.pending_input_top.append(TopRows(top_vals.cpu().numpy(), top_ids.cpu().numpy()))
    else:
        req.pending_input_top.extend([None] * len(rows))


def output_logprobs(reqs: list[Req], rows_logits: torch.Tensor, next_ids: torch.Tensor) -> dict[int, LogprobEntry]:
    """Each sampled row's token logprob (and its top-k), by row index, for the rows that asked."""
    want_lp = [i for i, r in enumerate(reqs) if r.return_logprob]
    lp_map: dict[int, LogprobEntry] = {}
    if not want_lp:
        return lp_map
    k = max(reqs[i].top_logprobs_num for i in want_lp)
    chosen, top_vals, top_ids = token_logprobs(rows_logits[want_lp], next_ids[want_lp], k)
    chosen_l = chosen.tolist()
    tv = top_vals.tolist() if top_vals is not None else None
    ti = top_ids.tolist() if top_ids is not None else None
    for j, i in enumerate(want_lp):
        n = reqs[i].top_logprobs_num
        top = list(zip(tv[j][:n], ti[j][:n])) if tv is not None and ti is not None and n > 0 else None
        lp_map[i] = (chosen_l[j], top)
    return lp_map


def run_logprobs(req: Req, rows_logits: torch.Tensor, run: list[int]) -> list[LogprobEntry] | None:
    """A verify row's emitted run, one entry per token (None unless the request asked)."""
    if not req.return_logprob:
        return None
    ids = torch.tensor(run, device=rows_logits.device)
    chosen, top_vals, top_ids = token_logprobs(rows_logits, ids, req.top_logprobs_num)
    tops = ([list(zip(v, t)) for v, t in zip(top_vals.tolist(), top_ids.tolist())]
            if top_vals is not None and top_ids is not None else [None] * len(run))
    return list(zip(chosen.tolist(), tops))
