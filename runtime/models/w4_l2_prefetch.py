"""Batch-1 4-bit decode: which linear hints which next linear's bytes into L2 (kernels/l2_prefetch.py).

A layer's linears run in the order qkv, o, gate_up, down, then the next layer's qkv; each may carry an `L2Plan` of
the one after it (`W4Weight.l2_next`): its codes' first MB (or all of them) and its scales (small, read by every
program: always whole), hinted before or after the carrier's own loop. The plan is a string,

    "o:all:2,gate_up:16:1"     target linear : MB of its codes ("all": every byte) : 1 before / 2 after the loop

read from $RADIXLM_W4_L2_PREFETCH (a benchmark's arms) or DEFAULT_PLAN, and applied when the split-norm decode
path (runtime/models/split_norm_decode.py) first runs and again whenever it changes. Hints change no result.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from radixlm.kernels.fp8_gemm import sm_count
from radixlm.kernels.l2_prefetch import L2Plan, L2Span

if TYPE_CHECKING:
    from radixlm.runtime.models.llama import LlamaForCausalLM

ENV = "RADIXLM_W4_L2_PREFETCH"
DEFAULT_PLAN = ""  # off until the H200 measures it (benchmarks/w4_decode_step.py variants pf-*)
ORDER = ("qkv", "o", "gate_up", "down")
ISSUERS_PER_SM = 2  # programs of the carrier that issue the hints, per SM of its device (264 on an H200)
_PARTS = {"qkv": ("self_attn", "qkv_proj"), "o": ("self_attn", "o_proj"), "gate_up": ("mlp", "gate_up_proj"),
          "down": ("mlp", "down_proj")}


def parse(plan: str) -> dict[str, tuple[float, int]]:
    """{target: (MB of its codes, inf for all; at 1 / 2)}; ValueError naming a bad entry."""
    out: dict[str, tuple[float, int]] = {}
    for entry in (e.strip() for e in plan.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3 or parts[0] not in ORDER or parts[2] not in ("1", "2"):
            raise ValueError(f"{ENV}: entry {entry!r} is not target:MB|all:1|2 with a target of {', '.join(ORDER)}")
        mb = float("inf") if parts[1] == "all" else float(parts[1])
        if mb < 0:
            raise ValueError(f"{ENV}: entry {entry!r} has negative MB")
        out[parts[0]] = (mb, int(parts[2]))
    return out


def current_plan() -> str:
    return os.environ.get(ENV, DEFAULT_PLAN)


def plan_for(weight, mb: float, at: int) -> L2Plan:
    """The hints of `weight` (a W4Weight): its codes' first `mb` MB (whole rows; of the copy its M = 1 kernel reads,
    `W4Weight.use_blocked_m1`'s if it has one; codes blocked in place (`W4Weight.blocked`) likewise: whole row tiles
    first there) and its scales."""
    codes, scales = weight.codes if weight.codes_m1 is None else weight.codes_m1, weight.scales
    row = codes.shape[1] * codes.element_size()
    rows = codes.shape[0] if mb == float("inf") else min(codes.shape[0], int(mb * (1 << 20)) // row)
    spans = (L2Span(codes, rows * row), L2Span(scales, scales.numel() * scales.element_size()))
    return L2Plan(spans, at, ISSUERS_PER_SM * sm_count(codes.device))


def wire(model: LlamaForCausalLM, plan: str) -> None:
    """Set every decoder linear's `l2_next` from `plan` (None where the plan names no hint of its successor)."""
    targets = parse(plan)
    chain = [getattr(getattr(layer, block), name).quantized for layer in model.layers
             for block, name in (_PARTS[kind] for kind in ORDER)]
    kinds = list(ORDER) * len(model.layers)
    for i, weight in enumerate(chain):
        nxt = i + 1
        hint = targets.get(kinds[nxt]) if nxt < len(chain) else None
        weight.l2_next = None if hint is None or hint[0] == 0 else plan_for(chain[nxt], *hint)
    model.l2_prefetch_plan = plan


def ensure(model: LlamaForCausalLM) -> None:
    """Wire the model to the current plan unless it already is (a string compare per forward; whoever swaps a
    weight's codes sets `model.l2_prefetch_plan` to None)."""
    plan = current_plan()
    if getattr(model, "l2_prefetch_plan", None) != plan:
        wire(model, plan)
