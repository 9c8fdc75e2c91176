"""speculative.py's measuring parts for the NGRAM mechanism (issue 18): a fresh SpecDecoder per cell, a
drafter that replays spec off's own tokens (the mechanism's cost at a known acceptance), where a decode
step's time goes with every step drafting, and the payoff's per-bucket arms in one line."""
from __future__ import annotations

import copy
import dataclasses
import time
import types
from typing import Any

import torch

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.speculative import verify_ahead
from radixlm.runtime.speculative.draft_payoff import DraftPayoff
from radixlm.runtime.speculative.ngram import NgramDrafter
from radixlm.runtime.speculative.spec_decoder import SpecDecoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


TREE_NODES = 8  # nodes per tree (64 rows x 9 tokens stay inside the GPU mode's CUDA graphs)


def set_small_m(sched: Scheduler, kernels: dict | None) -> dict:
    """Detach the bf16 small-M kernels (runtime/dense_small_m.py) from every linear (`kernels` None) or put back the
    ones given, and recapture the decode graphs (a captured graph keeps the kernels it was captured with): the
    verify rows' linears on cuBLAS vs on the small-M kernel, in one process. Returns what was attached before."""
    before = {name: m.small_m for name, m in sched.runner.model.named_modules() if getattr(m, "small_m", None)}
    for name, module in sched.runner.model.named_modules():
        if hasattr(module, "small_m"):
            module.small_m = (kernels or {}).get(name)
    graphs = sched.runner.graph_runner
    if graphs is not None:  # only the buckets the kernels can serve (larger ones never take them): seconds saved
        from radixlm.kernels.small_m import MAX_M

        buckets = graphs.buckets
        graphs.buckets = [bs for bs in buckets if bs <= MAX_M]
        try:
            graphs._capture_all()
        finally:
            graphs.buckets = buckets
    return before


def fresh_spec(sched: Scheduler, topk: int | None = None) -> SpecDecoder:
    """A SpecDecoder with fresh counters, acceptance and payoff; EAGLE3 keeps the loaded head.
    `topk`: NGRAM drafts trees of this branching (nodes up to depth x topk) instead of the server's."""
    if sched.spec is None or sched.spec.eagle is None:
        args = sched.args
        if topk is not None:
            args = dataclasses.replace(args, speculative_eagle_topk=topk,
                                       speculative_num_draft_tokens=TREE_NODES + 1 if topk > 1 else None)
        return SpecDecoder(args, sched.runner, None)
    spec = copy.copy(sched.spec)
    spec.verify_steps = spec.verify_tokens = spec.draft_tokens = spec.accepted_tokens = 0
    spec.acceptance, spec.payoff = {}, DraftPayoff(spec.max_drafts)
    return spec


class ReplayDrafter(NgramDrafter):
    """The mechanism's cost at a known acceptance: drafts the tokens spec off emitted for the same
    prompt at the same position (a measuring device, not a drafter: it needs the output beforehand),
    so every draft is accepted until bf16 rounding parts the two runs (random-weight logits tie often);
    after that drafts go on being verified, and rejected, so a step's cost stays the mechanism's."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]]) -> None:
        super().__init__(1)
        self.reference = reference

    def propose(self, key: int, prompt: list[int], output: list[int], max_tokens: int) -> list[int]:
        n = len(output)
        return self.reference.get(tuple(prompt), [])[n : n + max_tokens] if max_tokens > 0 else []

    def guess_after(self, key: int, prompt: list[int], output: list[int], drafts: list[int], max_tokens: int
                    ) -> list[int]:
        """(a verify step built ahead: spec off's tokens after the drafts, the bonus first)"""
        n = len(output) + len(drafts)
        return self.reference.get(tuple(prompt), [])[n : n + max_tokens] if max_tokens > 1 else []

    def propose_after(self, key: int, prompt: list[int], output: list[int], run: list[int], drafted: int,
                      max_tokens: int) -> list[int]:
        """(a verify step built once the one before it is verified, before its tokens are appended)"""
        n = len(output) + len(run)
        return self.reference.get(tuple(prompt), [])[n : n + max_tokens] if max_tokens > 0 else []


def step_sections(sched: Scheduler, prompts: list[list[int]], new_tokens: int, topk: int | None,
                  replay: bool = False, depth: int | None = None, ahead_ab: bool = False) -> dict:
    """Where a decode step's time goes, spec off (overlapped) and on with every step drafting (the
    payoff off): per decode step, wall ms of the step and of its host parts (drafting, batch build,
    the forward's launch + device sync, result processing). The forward is timed to a device sync,
    except with verify steps launched ahead (`sched.spec_ahead`: a sync would undo their overlap; the
    launch only). `replay`: the drafts are spec off's own tokens (ReplayDrafter: the mechanism at full
    acceptance). `ahead_ab`: also spec on without verify steps launched ahead ("on_noahead")."""
    out, kept, kept_ahead = {}, sched.spec, sched.spec_ahead
    reference: dict[tuple[int, ...], list[int]] = {tuple(p): [] for p in prompts}
    for arm in ("off", "on", "on_noahead") if ahead_ab else ("off", "on"):
        on = arm != "off"
        sched.spec_ahead = kept_ahead and arm == "on"
        ahead_before, rebuilt_before = sched.stats["ahead_steps"], sched.stats["ahead_rebuilt_steps"]
        spec = fresh_spec(sched, topk) if on else None
        if spec is not None:
            spec.payoff = None
            spec.max_drafts = depth or spec.max_drafts  # every step may draft this deep
            if replay:
                spec.drafter = ReplayDrafter(reference)
        sched.spec = spec
        sched.cache.flush()
        acc: dict[str, float] = {}
        wrapped = []

        def wrap(obj: Any, name: str, label: str) -> None:
            f = getattr(obj, name)

            def timed(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                r = f(*a, **k)
                if label == "forward" and on and not sched.spec_ahead:  # (else the launch only: the overlap kept)
                    sync(sched.device)
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
                return r
            setattr(obj, name, timed)
            wrapped.append((obj, name, f))
        if on:
            wrap(spec, "propose", "draft")
            wrap(sched.results, "process", "results")
            wrap(sched, "_apply", "apply")  # the results' events: outputs, finishes, KV bookkeeping
            wrap(sched, "_commit_step", "commit")  # an overlapped step's tokens, before a drafting step
            wrap(ScheduledBatch, "to_forward_batch", "build")  # (a class attribute: put back as it was)
            if sched.runner.cascade is not None:  # (inside build: which rows share a prefix)
                wrap(sched.runner.cascade, "plan", "cascade_plan")
            wrap(sched.req_to_token_pool, "commit", "slot_writes")
            wrap(verify_ahead, "build_next", "ahead_build")  # (a step built ahead: drafting + build + slot writes)
            wrap(verify_ahead, "wait", "ahead_wait")  # its device wait for the step in flight
        wrap(sched, "_schedule_decode", "schedule")
        wrap(sched.runner, "forward", "forward")
        for i, p in enumerate(prompts):
            sched.handle(TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
                temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)))
        while len(sched.running) < len(prompts):
            sched.step()
        acc.clear()
        steps, t = sched.stats["decode_steps"], time.perf_counter()
        while not sched.idle:
            sched.step()
            for o in sched.pop_outputs():
                if not on:
                    reference[tuple(prompts[int(o.rid[1:])])] += o.output_ids
        sync(sched.device)
        n = max(sched.stats["decode_steps"] - steps, 1)
        for obj, name, f in wrapped:
            if isinstance(obj, (type, types.ModuleType)):
                setattr(obj, name, f)
            else:
                delattr(obj, name)  # the instance attribute goes, the method shows again
        out[arm] = {"decode_steps": n, "step_ms": round((time.perf_counter() - t) / n * 1e3, 3),
                    **{f"{k}_ms": round(v / n * 1e3, 3) for k, v in acc.items()}}
        if spec is not None:
            out[arm].update(verify_steps=spec.verify_steps, draft_tokens=spec.draft_tokens,
                            tokens_per_verify=round(spec.verify_tokens / max(spec.verify_steps, 1), 2),
                            ahead_steps=sched.stats["ahead_steps"] - ahead_before,
                            ahead_rebuilt_steps=sched.stats["ahead_rebuilt_steps"] - rebuilt_before)
    sched.spec, sched.spec_ahead = kept, kept_ahead
    if ahead_ab:
        out["plain_over_drafting_noahead"] = round(out["off"]["step_ms"] / out["on_noahead"]["step_ms"], 3)
    # the mechanism's share kept: a plain step's time over a drafting one's (>= 0.8 meets issue 18's
    # batch-1 goal at any acceptance: speed-up = tokens per verify step x this)
    out["plain_over_drafting"] = round(out["off"]["step_ms"] / out["on"]["step_ms"], 3)
    return out


def payoff_line(payoff: dict | None, exploring: dict | None) -> str:
    """The payoff's buckets that measured a drafting arm, compactly: chosen k; per arm step ms, tok/s, intervals."""
    if not payoff:
        return "off"
    parts = []
    for bucket, cell in payoff.items():
        arms = sorted(int(key[1:-len("_tok_s")]) for key in cell if key.endswith("_tok_s"))
        if any(arms):
            k = cell["k"]
            ratio = f" T(k)/T0 {cell[f'k{k}_step_ms'] / cell['k0_step_ms']:.2f}" if k and 0 in arms else ""
            parts.append(f"{bucket} k={k}{ratio} " + " ".join(
                f"k{k}:{cell[f'k{k}_step_ms']:.2f}ms/{cell[f'k{k}_tok_s']:.0f}({cell.get(f'k{k}_n', 0)})" for k in arms))
    accept = next(iter(payoff.values()))["accept_rate"] if payoff else None
    return f"accept_rate {accept}  {exploring}  " + (" | ".join(parts) or "no drafting arm measured")


def verify_kernel_split(sched: Scheduler, live: list, ks: list[int], vocab: int, top: int = 10) -> list[dict]:
    """Which GPU kernels a batch-1 verify forward adds over a decode step: each k's forward (its rows built as the
    scheduler builds them) run eagerly (no graph: the profiler sees every kernel) 3 times under torch.profiler;
    per k the kernels' device µs per forward, the top ones, and the largest increases over k = 0 by kernel name."""
    import random

    from torch.profiler import ProfilerActivity, profile

    from radixlm.runtime.forward_batch import ForwardMode

    rng, out, base = random.Random(0), [], None
    graphs, sched.runner.graph_runner = sched.runner.graph_runner, None
    try:
        for k in [0, *ks]:
            slots = sched.kv_pool.alloc(len(live) * (k + 1))
            batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
            batch.set_decode_rows(live, slots, [[rng.randrange(100, vocab - 100) for _ in range(k)] for _ in live],
                                  [None] * len(live))
            fb, writes = batch.to_forward_batch(sched.device)
            sched.req_to_token_pool.commit(writes)
            sched.runner.forward(fb)  # warm (compiles, allocator)
            sync(sched.device)
            cuda = sched.device.type == "cuda"  # (a CPU smoke run: the host ops instead)
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    sched.runner.forward(fb)
                sync(sched.device)
            sched.kv_pool.free(slots)
            by_name: dict[str, float] = {}
            for e in prof.key_averages():
                us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) if cuda \
                    else e.self_cpu_time_total
                if us > 0:
                    by_name[e.key] = by_name.get(e.key, 0.0) + us / 3
            row = {"k": k, "device_us": round(sum(by_name.values()), 1),
                   "top": [(name[:80], round(us, 1)) for name, us in sorted(by_name.items(), key=lambda x: -x[1])[:top]]}
            if base is None:
                base = by_name
            else:
                grew = {n: us - base.get(n, 0.0) for n, us in by_name.items()}
                row["grew"] = [(name[:80], round(us, 1)) for name, us in sorted(grew.items(), key=lambda x: -x[1])[:top]]
            out.append(row)
    finally:
        sched.runner.graph_runner = graphs
    return out
