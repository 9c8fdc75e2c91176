"""A PEFT LoRA adapter folder, read and checked against the base model at load time.

The format is PEFT's own: `adapter_config.json` (r, lora_alpha, target_modules, use_rslora,
rank_pattern, alpha_pattern) and `adapter_model.safetensors` with `<module>.lora_A.weight`
[r, in] and `<module>.lora_B.weight` [out, r]. The update PEFT applies is B·A·x·scaling with
scaling = alpha / r (alpha / sqrt(r) with rslora); the scaling is folded into B here, so the
forward is two plain matmuls. Everything that could fail at request time fails here instead,
with the folder and the tensor named.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# PEFT module name (HF naming) -> (our fused projection, slice index within it)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_UNSUPPORTED_OPTIONS = {"use_dora": False, "modules_to_save": None, "fan_in_fan_out": False}


class AdapterError(ValueError):
    """A LoRA adapter folder this server cannot serve; the message names the folder and the cause."""


@dataclass(frozen=True)
class LoRAConfig:
    """The parts of PEFT's LoraConfig that decide the weights' meaning."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> "LoRAConfig":
        if raw.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{where}: peft_type {raw.get('peft_type')!r} is not LORA")
        for key, neutral in _UNSUPPORTED_OPTIONS.items():
            if raw.get(key) not in (neutral, None, [], {}):
                raise AdapterError(f"{where}: {key}={raw.get(key)!r} is not supported")
        if raw.get("bias", "none") != "none":
            raise AdapterError(f"{where}: bias={raw.get('bias')!r} is not supported (only 'none')")
        r = raw.get("r")
        if not isinstance(r, int) or r <= 0:
            raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            names = [t for t in TARGETS if t == targets or re.fullmatch(targets, t)]
            if targets == "all-linear":
                names = list(TARGETS)
        elif isinstance(targets, list) and targets:
            names = [str(t).rsplit(".", 1)[-1] for t in targets]
        else:
            raise AdapterError(f"{where}: target_modules is missing or empty")
        unknown = sorted(set(names) - set(TARGETS))
        if unknown or not names:
            raise AdapterError(f"{where}: target module(s) {unknown or targets} are not among "
                               f"{', '.join(TARGETS)} (LoRA on embeddings or the LM head is not supported)")
        return cls(r=r, lora_alpha=float(raw.get("lora_alpha", r)), target_modules=tuple(sorted(set(names))),
                   use_rslora=bool(raw.get("use_rslora", False)),
                   rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}))

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        """Rank and alpha of one module (`layers.3.self_attn.q_proj`), after rank/alpha_pattern
        (PEFT's rule: the first pattern matching a suffix of the name)."""
        r = next((int(v) for k, v in self.rank_pattern.items() if _pattern_matches(k, module_path)), self.r)
        alpha = next((float(v) for k, v in self.alpha_pattern.items() if _pattern_matches(k, module_path)),
                     self.lora_alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_matches(pattern: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


@dataclass(frozen=True)
class ModelShape:
    """What an adapter must fit: this rank's layers and each projection's (in, out) features."""

    num_layers: int
    features: dict[str, tuple[int, int]]  # HF module name (q_proj, ...) -> (in, out), unsharded


@dataclass
class LoRAAdapter:
    """One adapter in host memory: per (layer, HF module) the pair (A [r, in], B·scaling [out, r])."""

    name: str
    path: str
    config: LoRAConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def declared_max_rank(name: str, path: str | Path) -> int:
    """The largest rank an adapter folder's config declares (sizes the device slots)."""
    where = f"LoRA adapter {name!r} ({path})"
    file = Path(path).expanduser() / "adapter_config.json"
    if not file.is_file():
        raise AdapterError(f"{where}: no adapter_config.json")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: adapter_config.json cannot be read ({exc})") from None
    config = LoRAConfig.from_dict(raw, where)
    return max([config.r, *map(int, config.rank_pattern.values())])


def read_adapter(name: str, path: str | Path, shape: ModelShape, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read and check an adapter folder; raises AdapterError naming the folder and what is wrong."""
    folder = Path(path).expanduser()
    where = f"LoRA adapter {name!r} ({folder})"
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{where}: no adapter_config.json")
    try:
        config = LoRAConfig.from_dict(json.loads(cfg_file.read_text(encoding="utf-8")), where)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{where}: adapter_config.json is not valid JSON ({exc})") from None
    tensors = _read_tensors(folder, where)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: unexpected tensor {key!r} (only LoRA A/B of "
                               f"{', '.join(TARGETS)} are supported)")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in TARGETS:
            raise AdapterError(f"{where}: tensor {key!r} is for {module!r}, not one of {', '.join(TARGETS)}")
        if module not in config.target_modules:
            raise AdapterError(f"{where}: tensor {key!r} is for {module!r}, which target_modules does not list")
        if not 0 <= layer < shape.num_layers:
            raise AdapterError(f"{where}: tensor {key!r} is for layer {layer}; the model has {shape.num_layers}")
        pairs.setdefault((layer, module), {})[ab] = tensor
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        weights[(layer, module)] = _check_pair(config, layer, module, ab, shape, max_rank, where, dtype)
    for module in config.target_modules:
        if not any(m == module for _, m in weights):
            raise AdapterError(f"{where}: target module {module!r} is listed in target_modules but the "
                               "weights have no tensor for it")
    return LoRAAdapter(name=name, path=str(folder), config=config, weights=weights)


def _read_tensors(folder: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        extra = " (adapter_model.bin is not read: save with safe_serialization)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{where}: no adapter_model.safetensors{extra}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{where}: adapter_model.safetensors cannot be read ({exc})") from None


def _check_pair(config: LoRAConfig, layer: int, module: str, ab: dict[str, torch.Tensor], shape: ModelShape,
                max_rank: int, where: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    part = "self_attn" if TARGETS[module][0] in ("qkv_proj", "o_proj") else "mlp"
    path = f"layers.{layer}.{part}.{module}"
    for side in "AB":
        if side not in ab:
            raise AdapterError(f"{where}: {path} has no lora_{side}.weight")
    a, b = ab["A"], ab["B"]
    r, alpha = config.rank_alpha(path)
    in_f, out_f = shape.features[module]
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(f"{where}: {path}: lora_A/lora_B must be matrices")
    if a.shape[0] != r or b.shape[1] != r:
        raise AdapterError(f"{where}: {path}: rank {a.shape[0]} (lora_A) / {b.shape[1]} (lora_B) in the weights, "
                           f"but adapter_config.json says r={r}")
    if a.shape[1] != in_f or b.shape[0] != out_f:
        raise AdapterError(f"{where}: {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit this "
                           f"model's {module} ({in_f} -> {out_f} features)")
    if r > max_rank:
        raise AdapterError(f"{where}: {path} has rank {r}, above --max-lora-rank {max_rank}")
    scaled_b = b.float() * config.scaling(r, alpha)
    return a.to(dtype).contiguous(), scaled_b.to(dtype).contiguous()
