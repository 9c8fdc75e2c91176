"""How far NGRAM drafting can take a prompt set at batch 1, from spec off's own greedy outputs (issue 18).

No timing of drafting itself: each output is walked step by step as verification would walk it (a step emits
its accepted drafts plus one token), and a step with k drafts is priced by the verify cost measured on this
machine (a forward of 1 + k rows over a one-row decode step); with free rows the speed-up would be the tokens
per step. Three drafters:

- `ngram`: the runtime's own (NgramDrafter, the draft budget and per-request acceptance as SpecDecoder uses
  them at batch 1), the budget's beta from the measured cost of a row;
- `oracle_n1` / `oracle_n2`: a drafter that knows the output and, among every earlier place where the text's
  last 1 (2) tokens occurred, continues from the one whose continuation matches longest, drafting exactly the
  tokens that will be accepted (never a rejected one): an upper bound for any drafter that copies after a
  1- (2-) token match, whatever its rule for choosing among occurrences.

The speed-up is decode steps only (plain steps over priced steps): prefill, the same either way, is left out,
so the end-to-end figure is lower.
"""
from __future__ import annotations

from radixlm.runtime.speculative.draft_budget import Acceptance, grant
from radixlm.runtime.speculative.ngram import NgramDrafter


def oracle_steps(prompt: list[int], output: list[int], kmax: int, min_suffix: int) -> list[int]:
    """Accepted drafts per step: the longest continuation of an earlier occurrence of the last `min_suffix` tokens."""
    steps, pos = [], 0
    while pos < len(output):
        text = prompt + output[:pos]
        end, room = len(text), min(kmax, len(output) - pos - 1)
        suffix, best = text[end - min_suffix:], 0
        for j in range(min_suffix, end):
            if text[j - min_suffix : j] != suffix:
                continue
            a = 0
            while a < room and j + a < end and text[j + a] == output[pos + a]:
                a += 1
            best = max(best, a)
        steps.append(best)
        pos += best + 1
    return steps


def ngram_steps(prompt: list[int], output: list[int], kmax: int, beta: float) -> list[tuple[int, int]]:
    """(drafted, accepted) per step with the runtime's drafter and budget at batch 1."""
    drafter, acceptance, steps, pos = NgramDrafter(), Acceptance(), [], 0
    while pos < len(output):
        proposed = drafter.propose(0, prompt, output[:pos], max(min(kmax, len(output) - pos - 1), 0))
        draft = proposed[: grant([len(proposed)], [acceptance.rate], beta)[0]]
        a = 0
        while a < len(draft) and draft[a] == output[pos + a]:
            a += 1
        if draft:
            acceptance.record(len(draft), a)
            drafter.on_verified(0, len(draft), a)
        else:
            acceptance.idle()
        steps.append((len(draft), a))
        pos += a + 1
    return steps


def ceiling(pairs: list[tuple[list[int], list[int]]], cost: list[float], kmax: int) -> dict[str, dict]:
    """Per drafter: tokens per step (the speed-up with free verify rows), drafts, and the decode-step speed-up at
    the measured cost (cost[k]: a verify step with k drafts over a decode step, k = 0 .. at least kmax).
    `kmax`: the runtime drafter's draft limit; the oracles draft up to the table's deepest k."""
    rho = (cost[kmax] - 1.0) / kmax  # the budget's price of a row (as row_cost.py measures it: a slope)
    runs = {"ngram": [s for p, o in pairs for s in ngram_steps(p, o, kmax, rho / (1.0 - rho))]}
    for n in (1, 2):
        runs[f"oracle_n{n}"] = [(a, a) for p, o in pairs for a in oracle_steps(p, o, len(cost) - 1, n)]
    out = {}
    for name, steps in runs.items():
        tokens = sum(a + 1 for _, a in steps)
        out[name] = {"steps": len(steps), "tokens": tokens, "drafts": sum(d for d, _ in steps),
                     "tokens_per_step": round(tokens / len(steps), 3),
                     "speedup": round(tokens / sum(cost[d] for d, _ in steps), 3)}
    return out
