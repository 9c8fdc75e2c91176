"""4-bit checkpoints: which scheme a `quantization_config` declares, and the collector that gathers
each layer's packed tensors while the model loads and builds its `W4Weight`.

Accepted as published: quant_method "gptq" (bits 4, any group size or -1, sym or not, desc_act
or not, checkpoint_format gptq / gptq_v2), "awq" (bits 4, GEMM packing, zero points) and
"compressed-tensors" with format "pack-quantized" (int 4-bit weights, strategy group or channel,
no activation quantization: W4A16). Anything else is refused by name (see w4_formats.py for the
layouts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from radixlm.runtime.quantization.w4_formats import unpack_awq, unpack_gptq, unpack_pack_quantized
from radixlm.runtime.quantization.w4a16 import W4Weight

KINDS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}
_CODES = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_packed"}
MODES = {"gptq": "gptq", "awq": "awq", "compressed-tensors": "w4a16"}  # the resolved --quantization


@dataclass(frozen=True)
class W4Scheme:
    method: str  # gptq | awq | compressed-tensors
    group_size: int  # -1: one group per output channel
    symmetric: bool
    act_order: bool  # GPTQ desc_act (or a compressed-tensors g_idx)
    zero_offset: int = 0  # GPTQ v1 stores z - 1

    @property
    def mode(self) -> str:
        return MODES[self.method]


def gptq_scheme(qc: dict[str, Any]) -> W4Scheme:
    _four_bits(qc.get("bits"), "gptq bits")
    fmt = qc.get("checkpoint_format", "marlin" if qc.get("is_marlin_format") else "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"model_path: gptq checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    return W4Scheme("gptq", _group(qc.get("group_size", 128)), bool(qc.get("sym", True)), bool(qc.get("desc_act")),
                    1 if fmt == "gptq" else 0)


def awq_scheme(qc: dict[str, Any]) -> W4Scheme:
    _four_bits(qc.get("bits", qc.get("w_bit")), "awq bits")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"model_path: awq version {version!r} is not supported (GEMM packing only)")
    if not qc.get("zero_point", True):
        raise ValueError("model_path: awq without zero points is not supported")
    return W4Scheme("awq", _group(qc.get("group_size", qc.get("q_group_size", 128))), False, False)


def pack_quantized_scheme(groups: list[dict[str, Any]], describe) -> W4Scheme:
    """compressed-tensors config groups of format pack-quantized: one W4A16 scheme for all."""
    schemes = set()
    for group in groups:
        w = group.get("weights") or {}
        if w.get("type") != "int" or w.get("num_bits") != 4 or w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"model_path: compressed-tensors pack-quantized weights {describe(w)} are not supported "
                             "(4-bit int, strategy group or channel)")
        if group.get("input_activations"):
            raise ValueError("model_path: compressed-tensors pack-quantized with quantized activations is not supported "
                             "(W4A16 only)")
        size = _group(w.get("group_size") or 128) if w["strategy"] == "group" else -1
        schemes.add(W4Scheme("compressed-tensors", size, bool(w.get("symmetric", True)),
                             w.get("actorder") in ("group", "dynamic")))
    if len(schemes) != 1:
        raise ValueError("model_path: compressed-tensors config groups with different 4-bit schemes are not supported")
    return schemes.pop()


def _four_bits(bits: Any, what: str) -> None:
    if bits != 4:
        raise ValueError(f"model_path: {what} {bits!r} is not supported (4-bit only)")


def _group(size: Any) -> int:
    size = int(size)
    if size != -1 and (size <= 0 or size % 32):
        raise ValueError(f"model_path: group_size {size} is not supported (a multiple of 32, or -1)")
    return size


class W4Checkpoint:
    """module name -> row offset -> {kind: tensor}, for the tensors of one 4-bit scheme."""

    def __init__(self, scheme: W4Scheme) -> None:
        self.scheme = scheme
        self.kinds = KINDS[scheme.method]
        self._parts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}

    def add(self, module: str, offset: int, kind: str, tensor: Any) -> None:
        t = tensor if isinstance(tensor, torch.Tensor) else tensor[:]
        self._parts.setdefault(module, {}).setdefault(offset, {})[kind] = t

    def is_codes(self, kind: str) -> bool:
        """The tensor that stands for the layer's weight (the loader counts it as loaded)."""
        return kind == _CODES[self.scheme.method]

    def modules(self) -> list[str]:
        return sorted(self._parts)

    def build(self, module: str, rows: int, in_features: int, device: torch.device) -> W4Weight:
        parts = []
        for offset, fields in sorted(self._parts[module].items()):
            parts.append(self._unpack(module, offset, {k: v.to(device) for k, v in fields.items()}))
        got = sum(int(p.codes.shape[0]) for p in parts)
        if got != rows or any(p.codes.shape[1] != in_features for p in parts):
            raise ValueError(f"model_path: 4-bit layer {module!r} unpacks to {got} x {int(parts[0].codes.shape[1])}, "
                             f"expected {rows} x {in_features} (a fused layer must be 4-bit in every part)")
        size = self.scheme.group_size if self.scheme.group_size > 0 else in_features
        try:
            return W4Weight(parts, size, self.scheme.method)
        except ValueError as exc:
            raise ValueError(f"model_path: 4-bit layer {module!r}: {exc}") from None

    def _unpack(self, module: str, offset: int, f: dict[str, torch.Tensor]):
        method = self.scheme.method
        need = {"gptq": ("qweight", "qzeros", "scales"), "awq": ("qweight", "qzeros", "scales"),
                "compressed-tensors": ("weight_packed", "weight_scale")}[method]
        missing = [k for k in need if k not in f]
        if not self.scheme.symmetric and method == "compressed-tensors" and "weight_zero_point" not in f:
            missing.append("weight_zero_point")
        if missing:
            raise ValueError(f"model_path: 4-bit layer {module!r} (rows from {offset}) has no {', '.join(missing)}")
        if method == "gptq":
            return unpack_gptq(f["qweight"], f["qzeros"], f["scales"], f.get("g_idx"), self.scheme.zero_offset)
        if method == "awq":
            return unpack_awq(f["qweight"], f["qzeros"], f["scales"])
        return unpack_pack_quantized(f["weight_packed"], f["weight_scale"], f.get("weight_zero_point"),
                                     f.get("weight_shape"), f.get("weight_g_idx"))
