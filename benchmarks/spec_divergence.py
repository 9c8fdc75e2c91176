"""Where speculation's greedy outputs differ from speculation off, and why (issue 18, bf16 on a GPU).

A verify step runs rows x (k + 1) tokens, plain decoding one row a request: in bf16 the two round
differently (other GEMM kernels and tile shapes, other attention splits), so a greedy output may
legitimately part at a near-tie — two logits within a rounding step of each other. A wrong tree mask,
rotary position or stale KV would instead show as logits far from spec off's *before* any token
differs. So the audit re-runs both sides with top-2 logprobs and reports per request:

- the first differing output position (the step), spec off's top-2 there and the verify's top-2 there
  (the gap of two logprobs is the gap of their logits);
- the drift before it: max |chosen-token logprob, on - off| over the common positions, split by where
  spec on's token came from — a plain decode step, a verify row read through the request's own row
  (lane 0: the root and first chain) or one read through a tree's scratch lane (a branch). Lanes
  drifting like lane 0 and a divergence at a near-tie mean numerics; a branch drifting far more
  means the tree path computes something else.
"""
from __future__ import annotations

from typing import Any

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler

NEAR_TIE = 0.05  # a top-2 logprob (= logit) gap below this is a near-tie: bf16 rounding may flip it
ORIGINS = ("decode", "lane0", "branch")


def _run_with_logprobs(sched: Scheduler, prompts: list[list[int]], batch: int, new_tokens: int) -> dict[str, dict]:
    """Greedy runs (groups of `batch`, rids "group-index") with top-2 logprobs; per request its tokens,
    top-2 and chosen logprobs, and each position's origin (see module doc)."""
    out: dict[str, dict] = {}
    verify = sched.results._verify

    def tracing(batch_: Any, indices: list[int], *args: Any) -> list:
        events = verify(batch_, indices, *args)
        for i, ev in zip(indices, events):
            lane_of = batch_.draft_tree(i).lanes()[0]
            origin = out[ev.req.rid]["origin"]
            base = len(ev.req.output_ids) - ev.sampled
            for j in range(ev.sampled):  # token j came from the root's row (j = 0) or kept node j - 1's
                node = ev.kept[j - 1] if j else None
                origin[base + j] = "branch" if node is not None and lane_of[node] > 0 else "lane0"
        return events

    sched.results._verify = tracing  # type: ignore[method-assign]
    try:
        for g in range(0, len(prompts), batch):
            for i, p in enumerate(prompts[g : g + batch]):
                rid = f"{g // batch}-{i}"
                out[rid] = {"tokens": [], "top": [], "chosen": [], "origin": {}}
                sched.handle(TokenizedGenerateReq(rid=rid, input_ids=p, return_logprob=True, top_logprobs_num=2,
                                                  params=SamplingParams(temperature=0.0, max_new_tokens=new_tokens,
                                                                        ignore_eos=True)))
            while not sched.idle:
                sched.step()
                for o in sched.pop_outputs():
                    r = out[o.rid]
                    r["tokens"] += o.output_ids
                    r["top"] += list(o.output_top_logprobs or [])
                    r["chosen"] += [lp for lp, _ in (o.output_token_logprobs or [])]
    finally:
        sched.results._verify = verify  # type: ignore[method-assign]
    return out


def _top2(top: list) -> tuple[list, float | None]:
    pairs = [(int(t), round(float(lp), 4)) for lp, t in top[:2]]
    return pairs, (round(float(top[0][0] - top[1][0]), 4) if len(top) >= 2 else None)


def divergence_audit(sched: Scheduler, prompts: list[list[int]], batch: int, new_tokens: int,
                     outs: dict[bool, dict[str, list[int]]], spec: Any = None) -> dict:
    """`outs`: the timed runs' tokens {False: off, True: on}. `spec`: a fresh SpecDecoder like the timed
    run's (None: the scheduler's own); spec on is re-run with it (a fresh payoff may choose other
    steps, so the re-run says whether it reproduces the timed tokens; its own divergences are audited)."""
    saved = sched.spec
    try:
        sched.spec = None
        sched.cache.flush()
        off = _run_with_logprobs(sched, prompts, batch, new_tokens)
        sched.spec = spec if spec is not None else saved
        sched.cache.flush()
        on = _run_with_logprobs(sched, prompts, batch, new_tokens)
    finally:
        sched.spec = saved
    report: dict = {
        "near_tie_rule": f"spec-off top-2 logprob gap < {NEAR_TIE} at the first differing position",
        "timed_differing": sum(outs[False][rid] != outs[True][rid] for rid in outs[False]),
        "rerun_reproduces_off": all(off[rid]["tokens"] == outs[False][rid] for rid in off),
        "rerun_reproduces_on": all(on[rid]["tokens"] == outs[True].get(rid) for rid in on),
        "requests": len(off), "cases": [],
    }
    drift = dict.fromkeys(ORIGINS, 0.0)
    counts = dict.fromkeys(ORIGINS, 0)
    for rid in sorted(off):
        a, b = off[rid], on[rid]
        pos = next((j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        common = pos if pos is not None else min(len(a["chosen"]), len(b["chosen"]))
        for j in range(common):
            where = b["origin"].get(j, "decode")
            drift[where] = max(drift[where], abs(a["chosen"][j] - b["chosen"][j]))
            counts[where] += 1
        if pos is None:
            continue
        off_top, off_gap = _top2(a["top"][pos]) if pos < len(a["top"]) else ([], None)
        on_top, on_gap = _top2(b["top"][pos]) if pos < len(b["top"]) else ([], None)
        report["cases"].append({
            "rid": rid, "position": pos, "off_token": a["tokens"][pos], "on_token": b["tokens"][pos],
            "origin": b["origin"].get(pos, "decode"), "off_top2": off_top, "gap": off_gap, "on_top2": on_top,
            "on_gap": on_gap, "on_is_off_second": len(off_top) == 2 and b["tokens"][pos] == off_top[1][0],
            "near_tie": off_gap is not None and off_gap < NEAR_TIE,
        })
    report["differing"] = len(report["cases"])
    report["near_ties"] = sum(c["near_tie"] for c in report["cases"])
    report["max_gap"] = max((c["gap"] for c in report["cases"] if c["gap"] is not None), default=None)
    report["drift"] = {k: float(f"{v:.3g}") for k, v in drift.items()}
    report["positions"] = counts
    return report


def audit_lines(div: dict) -> list[str]:
    """The audit in a few printable lines."""
    d, n = div["drift"], div["positions"]
    lines = [f"  audit: differing {div['differing']}/{div['requests']} (timed {div['timed_differing']}; re-runs "
             f"reproduce off {div['rerun_reproduces_off']}, on {div['rerun_reproduces_on']}); max |dlogprob| before "
             f"any difference: decode {d['decode']:.1e} ({n['decode']}), lane 0 {d['lane0']:.1e} ({n['lane0']}), "
             f"branch lanes {d['branch']:.1e} ({n['branch']})"]
    for c in div["cases"][:3]:
        lines.append(f"    req {c['rid']} step {c['position']} ({c['origin']}): off top2 {c['off_top2']} gap {c['gap']}"
                     f" | on top2 {c['on_top2']} gap {c['on_gap']} | near-tie {c['near_tie']}")
    if len(div["cases"]) > 3:
        lines.append(f"    ... {len(div['cases']) - 3} more; near-ties {div['near_ties']}, max gap {div['max_gap']}")
    return lines
