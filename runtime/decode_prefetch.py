"""L2 prefetch of the next GEMM's weights during a small-batch decode step (--decode-l2-prefetch).

At batch 1 a decode layer is four weight-streaming GEMMs with latency-bound small kernels between
them (rotary, KV store, decode attention before o_proj; a norm before gate_up; SiLU-and-mul before
down; a norm before the next layer's qkv), ~15 µs a layer during which HBM is idle. As each GEMM ends
this forks a side stream that hints L2 to load the first bytes of the weight the next GEMM reads
(kernels/l2_prefetch.py): all of o_proj (33.5 MB at the 8B shape fits the H200's 50 MB L2) while
attention runs, the first MBs of the others. The main stream never waits for the side stream until
the end of the forward (the join CUDA-graph capture needs), and the hints change no value: outputs are
the same bits with it on or off.

Only dense (bf16 / fp16) weights are prefetched; a quantized layer's target is skipped.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixlm.kernels.l2_prefetch import prefetch_l2

if TYPE_CHECKING:
    from radixlm.runtime.forward_batch import ForwardBatch
    from radixlm.runtime.models.llama import LlamaForCausalLM

PLAN_ENV = "RADIXLM_DECODE_PREFETCH_PLAN"  # "key=value,..." overriding PrefetchPlan fields (benchmark sweeps)
GEMMS = ("qkv", "o", "gate_up", "down")  # a layer's GEMMs in order; each one's successor is prefetched after it
MB = 1 << 20


@dataclass(frozen=True)
class PrefetchPlan:
    """MB of the next weight to prefetch after each GEMM (capped at the weight's size), the largest decode
    batch it applies to, and how the hints are issued (kernels/l2_prefetch.py)."""

    after_qkv: float = 48.0  # of o_proj
    after_o: float = 8.0  # of gate_up
    after_gate_up: float = 6.0  # of down
    after_down: float = 8.0  # of the next layer's qkv (the last layer: of the LM head)
    max_bs: int = 8
    mode: str = "bulk"
    layout: str = "prefix"  # or "cols": the first columns of every row (what a GEMV reads first)
    chunk: int = 16384
    programs: int = 32
    lanes: int = 32

    def mb_after(self, gemm: str) -> float:
        return float(getattr(self, f"after_{gemm}"))

    @classmethod
    def parse(cls, text: str) -> "PrefetchPlan":
        """"after_qkv=32,mode=line" -> the default plan with those fields replaced."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            if key not in fields:
                raise ValueError(f"{PLAN_ENV}: unknown field {key!r} (fields: {', '.join(fields)})")
            kind = {"float": float, "int": int, "str": str}[str(fields[key])]
            values[key] = kind(value)
        return dataclasses.replace(cls(), **values)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls) -> "PrefetchPlan":
        return cls.parse(os.environ.get(PLAN_ENV, ""))


def _dense_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The module's float weight when that is what its GEMM reads (not quantized, not dropped)."""
    weight = getattr(module, "weight", None)
    if getattr(module, "quantized", None) is not None or weight is None or weight.numel() == 0:
        return None
    return weight if weight.is_floating_point() and weight.element_size() >= 2 else None


class DecodeL2Prefetch:
    """Owns the side stream and, per layer and GEMM, the weight to warm after it and how many bytes."""

    def __init__(self, model: "LlamaForCausalLM", plan: PrefetchPlan) -> None:
        self.plan = plan
        self.stream: torch.cuda.Stream | None = None  # made at the first hint (none on the CPU)
        self.forked = False
        layers = list(model.layers)
        # after the last layer's down: the LM head (its first bytes; it runs right after the graph)
        head = model.lm_head if model.lm_head is not None else model.embed_tokens
        self.targets: list[dict[str, tuple[torch.Tensor, int]]] = []
        for i, layer in enumerate(layers):
            successors = {
                "qkv": layer.self_attn.o_proj,
                "o": layer.mlp.gate_up_proj,
                "gate_up": layer.mlp.down_proj,
                "down": layers[i + 1].self_attn.qkv_proj if i + 1 < len(layers) else head,
            }
            targets: dict[str, tuple[torch.Tensor, int]] = {}
            for gemm, module in successors.items():
                weight = None if module is None else _dense_weight(module)
                nbytes = int(plan.mb_after(gemm) * MB)
                if weight is not None and nbytes > 0:
                    targets[gemm] = (weight, min(nbytes, weight.numel() * weight.element_size()))
            self.targets.append(targets)

    def applies(self, batch: "ForwardBatch") -> bool:
        from radixlm.runtime.forward_batch import ForwardMode

        return batch.mode is ForwardMode.DECODE and batch.batch_size <= self.plan.max_bs

    def after(self, layer: int, gemm: str) -> None:
        """Called on the main stream right after `gemm` of `layer` is issued: fork, hint, no wait."""
        target = self.targets[layer].get(gemm)
        if target is None or not target[0].is_cuda:  # (on the CPU there is no L2 to warm)
            return
        weight, nbytes = target
        if self.stream is None:
            self.stream = torch.cuda.Stream(weight.device)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            prefetch_l2(weight, nbytes, mode=self.plan.mode, chunk=self.plan.chunk, programs=self.plan.programs,
                        lanes=self.plan.lanes, layout=self.plan.layout)
        self.forked = True

    def join(self) -> None:
        """End of the forward: the main stream takes the side stream's work back (graph capture needs it)."""
        if self.forked and self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.forked = False


def build(model: "LlamaForCausalLM", mode: str, device: torch.device, dtype: torch.dtype) -> DecodeL2Prefetch | None:
    """The prefetcher for --decode-l2-prefetch `mode` (auto / on / off), or None where it does not apply:
    not CUDA, or a dtype whose GEMMs do not stream 2-byte weights."""
    if mode == "off" or device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    if mode == "auto" and not AUTO_ON:
        return None
    pf = DecodeL2Prefetch(model, PrefetchPlan.from_env())
    return pf if any(pf.targets) else None


AUTO_ON = False  # auto: off — on the H200 it won nothing at batch 1 (RESULTS.md, 2026-12-03)
