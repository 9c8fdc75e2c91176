"""A checkpoint's own quantization, read from config.json's `quantization_config` as published.

FP8 (two dialects) and 4-bit weight-only checkpoints (w4_checkpoint.py: gptq, awq, compressed-tensors
pack-quantized) load as they are. The FP8 dialects:
  * quant_method "fp8" (vLLM / SGLang / ModelOpt exports): `weight` float8_e4m3fn, `weight_scale` per
    tensor (or per channel), `input_scale` when activation_scheme is "static";
  * quant_method "compressed-tensors" (the `compressed-tensors` package, llm-compressor's output):
    format "float-quantized", 8-bit float weights of strategy tensor / channel, input activations
    of strategy tensor (static) or token (dynamic).
KV-cache scales, where a checkpoint has them, are `self_attn.k_scale` / `self_attn.v_scale` (or the
older `k_proj.output_scale` / `v_proj.output_scale`). Anything else (block-wise FP8, int8, FP4, 3- or
8-bit GPTQ) is refused by name rather than loaded wrongly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radixlm.runtime.quantization.w4_checkpoint import W4Scheme, awq_scheme, gptq_scheme, pack_quantized_scheme

METHODS = ("fp8", "compressed-tensors", "gptq", "awq")


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # "fp8" | "compressed-tensors" | "gptq" | "awq"
    static_activations: bool  # one input_scale per layer (else per-token scales at run time)
    weight_strategy: str  # "tensor" | "channel" | "group"
    w4: W4Scheme | None = None  # a 4-bit weight-only checkpoint's scheme (None: FP8)


def read_checkpoint_quantization(model_dir: str | Path) -> CheckpointQuantization | None:
    """The checkpoint's FP8 or 4-bit scheme, None for an unquantized one; ValueError naming what is unsupported."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return _fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method in ("gptq", "awq"):
        scheme = gptq_scheme(qc) if method == "gptq" else awq_scheme(qc)
        return CheckpointQuantization(method, False, "group", scheme)
    raise ValueError(f"model_path: quantization_config quant_method {method!r} is not supported "
                     f"(supported: {', '.join(METHODS)})")


def _fp8(qc: dict[str, Any]) -> CheckpointQuantization:
    if qc.get("weight_block_size"):
        raise ValueError(f"model_path: block-wise FP8 (weight_block_size {qc['weight_block_size']}) is not supported; "
                         "per-tensor or per-channel scales only")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"model_path: FP8 activation_scheme {scheme!r} is not dynamic or static")
    return CheckpointQuantization("fp8", scheme == "static", "tensor")


def _compressed_tensors(qc: dict[str, Any]) -> CheckpointQuantization:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ValueError("model_path: compressed-tensors quantization_config has no config_groups")
    if all((g.get("format") or qc.get("format")) == "pack-quantized" for g in groups):
        return CheckpointQuantization("compressed-tensors", False, "group", pack_quantized_scheme(groups, _describe))
    found: set[tuple[bool, str]] = set()
    for group in groups:
        fmt = group.get("format") or qc.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"model_path: compressed-tensors format {fmt!r} is not supported "
                             "(float-quantized FP8, or pack-quantized W4A16 in every group)")
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("tensor", "channel"):
            raise ValueError(f"model_path: compressed-tensors weights {_describe(w)} are not supported "
                             "(8-bit float, strategy tensor or channel)")
        if w.get("dynamic"):
            raise ValueError("model_path: compressed-tensors dynamic weight scales are not supported")
        a = group.get("input_activations")
        if not a or a.get("type") != "float" or a.get("num_bits") != 8:
            raise ValueError(f"model_path: compressed-tensors input activations {_describe(a or {})} are not "
                             "supported (FP8 W8A8 only)")
        if a.get("dynamic") and a.get("strategy") == "token":
            found.add((False, w["strategy"]))
        elif not a.get("dynamic") and a.get("strategy") == "tensor":
            found.add((True, w["strategy"]))
        else:
            raise ValueError(f"model_path: compressed-tensors input activations {_describe(a)} are not supported "
                             "(static per tensor or dynamic per token)")
    if len(found) != 1:
        raise ValueError("model_path: compressed-tensors config groups with different FP8 schemes are not supported")
    static, strategy = found.pop()
    return CheckpointQuantization("compressed-tensors", static, strategy)


def _describe(args: dict[str, Any]) -> str:
    keys = ("type", "num_bits", "strategy", "dynamic", "group_size")
    return "(" + ", ".join(f"{k}={args.get(k)}" for k in keys if k in args) + ")"
