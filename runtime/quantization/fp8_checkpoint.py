"""Collects an FP8 checkpoint's tensors while the model loads, and builds each layer's `Fp8Weight`.

A layer's codes (`weight`, float8_e4m3fn), `weight_scale` and `input_scale` arrive as separate
tensors, in any order, and a fused layer (qkv, gate_up) has one set per checkpoint part; the weight
is built once every part is in. Names are those of checkpoint/README formats (see checkpoint.py).
"""
from __future__ import annotations

import re
from typing import Any

import torch

from radixlm.runtime.quantization.fp8 import Fp8Part, Fp8Weight

FP8_SCALE_KINDS = ("weight_scale", "input_scale")
# layers.N.self_attn.k_scale / v_scale (compressed-tensors, vLLM) or k_proj / v_proj.output_scale (older exports)
KV_SCALE_NAME = re.compile(r"^layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")


def fp8_scalar(tensor: Any) -> float:
    """A one-element scale tensor (or lazy safetensors slice) as a float."""
    t = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
    if t.numel() != 1:
        raise ValueError(f"model_path: a KV-cache scale must be one value, got shape {tuple(t.shape)}")
    return float(t.float().reshape(()))


class Fp8Checkpoint:
    """module name -> row offset -> {'weight' | 'weight_scale' | 'input_scale': tensor}."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def add(self, module: str, offset: int, kind: str, tensor: Any) -> None:
        t = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
        self._parts.setdefault(module, {}).setdefault(offset, {})[kind] = t

    def modules(self) -> list[str]:
        """Layers with FP8 codes (scales alone, e.g. of an ignored layer, are refused in build)."""
        return sorted(self._parts)

    def build(self, module: str, rows: int, device: torch.device) -> Fp8Weight:
        parts = []
        for offset, fields in sorted(self._parts[module].items()):
            if "weight" not in fields or "weight_scale" not in fields:
                missing = "weight" if "weight" not in fields else "weight_scale"
                raise ValueError(f"model_path: FP8 layer {module!r} (rows from {offset}) has no {missing}")
            parts.append(Fp8Part(fields["weight"].to(device), fields["weight_scale"].to(device),
                                 fields.get("input_scale")))
        got = sum(int(p.codes.shape[0]) for p in parts)
        if got != rows:
            raise ValueError(f"model_path: FP8 layer {module!r} has {got} of its {rows} rows in FP8 "
                             "(a fused layer must be FP8 in every part)")
        return Fp8Weight.from_parts(parts, "checkpoint")
