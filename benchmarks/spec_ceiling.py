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


# ------------------------------------------------------------------ batch 1 on a GPU (the overlap schedule), replayed
# The H200's batch-1 step costs, 8B shape (spec8's step traces, 2026-12-05, results/speculative_gpu_spec8-h200-20261205
# .json): spec off's overlapped decode step; spec on's plain step (no drafts: overlapped while the request is dry); a
# verify step with d drafts (the traces' d = 1..4 means, fitted: ~4.7 ms at d = 1, ~5.1 at d = 4); the prompt's
# prefill off and on (synchronous with NGRAM on).
H200_BATCH1_MS = {"off_step": 4.125, "plain": 4.31, "verify": 4.6, "verify_per_draft": 0.13, "prefill_off": 20.9,
                  "prefill_on": 24.3}
# drafter settings replayed: (min_match: 1 = a single matching token drafts, follow_source: copy_source.py, deep_short:
# matches of 1-3 tokens draft k deep) — spec_decoder's SHORT_MATCH_ROWS, COPY_SOURCE_ROWS, SHORT_DEPTH_ROWS
GPU_BATCH1_ARMS = {"default": (2, False, False), "short": (1, False, False), "source": (2, True, False),
                   "short+source": (1, True, False), "short+source+deep": (1, True, True)}


def overlap_steps(prompt: list[int], output: list[int], k: int, min_match: int = 2, follow_source: bool = False,
                  deep_short: bool = False) -> list[tuple[int, int]]:
    """(drafted, accepted) per decode step of one request at batch 1 as the SpecDecoder runs it with the overlap
    schedule and FULL_DEPTH_ROWS (chains k deep, the budget granting all: a row costs ~nothing there): output[0] comes
    from the prefill; a step whose lookup finds nothing decodes plainly and makes the request dry; a dry request's
    steps are overlapped plain steps, and `refresh` (after the commit of the token before the step's) lets the next
    step draft again. `min_match` / `follow_source` / `deep_short`: the drafter's settings (SHORT_MATCH_ROWS,
    COPY_SOURCE_ROWS, SHORT_DEPTH_ROWS)."""
    drafter = NgramDrafter(short=min_match == 1)
    drafter.min_depth, drafter.min_match, drafter.follow_source, drafter.deep_short = k, min_match, follow_source, deep_short
    steps: list[tuple[int, int]] = []
    pos, dry, n = 1, False, len(output)
    while pos < n:
        room = min(k, n - pos - 1)
        if dry:  # launched overlapped; the refresh reads the text without this step's token
            steps.append((0, 0))
            pos += 1
            dry = not (pos < n and drafter.propose(0, prompt, output[: pos - 1], 1))
            continue
        draft = drafter.propose(0, prompt, output[:pos], room) if room > 0 else []
        if not draft:
            dry = room > 0
            steps.append((0, 0))
            pos += 1
            continue
        a = 0
        while a < len(draft) and draft[a] == output[pos + a]:
            a += 1
        drafter.on_verified(0, len(draft), a)
        steps.append((len(draft), a))
        pos += a + 1
    return steps


def priced_batch1(steps: list[tuple[int, int]], tokens: int, ms: dict[str, float] = H200_BATCH1_MS) -> dict:
    """One request's replayed steps on a batch-1 clock (`ms`): plain and verify steps, tokens per verify step (a), the
    speed-up x over spec off (prefill included), the issue's x / a, and x over tokens per decode step of any kind."""
    plain = sum(1 for d, _ in steps if d == 0)
    verify = [(d, a) for d, a in steps if d > 0]
    emitted = sum(a + 1 for _, a in verify)
    on = ms["prefill_on"] + plain * ms["plain"] + sum(ms["verify"] + ms["verify_per_draft"] * d for d, _ in verify)
    x = (ms["prefill_off"] + (tokens - 1) * ms["off_step"]) / on
    a = emitted / len(verify) if verify else 1.0
    return {"plain_steps": plain, "verify_steps": len(verify), "drafts": sum(d for d, _ in verify),
            "accepted": sum(a for _, a in verify), "accept": round(a, 3), "speedup": round(x, 3),
            "x_per_accept": round(x / a, 3), "x_per_step_tokens": round(x * len(steps) / max(tokens - 1, 1), 3)}


def gpu_batch1_arms(pairs: list[tuple[list[int], list[int]]], k: int = 4,
                    arms: dict[str, tuple[int, bool, bool]] = GPU_BATCH1_ARMS) -> dict[str, dict]:
    """Per drafter arm, every (prompt, output) pair replayed at batch 1 on the H200's clock, and their mean."""
    out = {}
    for name, settings in arms.items():
        runs = [priced_batch1(overlap_steps(p, o, k, *settings), len(o)) for p, o in pairs]
        out[name] = {"mean": {key: round(sum(r[key] for r in runs) / len(runs), 3) for key in runs[0]}, "runs": runs}
    return out
