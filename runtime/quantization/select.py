"""Which storage each linear layer gets, decided once at load time.

`resolve_quantization` turns the user's `--quantization` (and `--dtype`) into a mode for the whole
model; `build_quantized_weight` then picks a `QuantizedWeight` per layer from the tensors that
checkpoint gives it, or None where no kernel takes them (the layer then loads dequantized). A GPU
format (issue 19) adds a mode here and a subclass of `QuantizedWeight`.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization import packed_cache
from radixlm.runtime.quantization.base import QuantizedWeight
from radixlm.runtime.quantization.checkpoint import CheckpointQuantization
from radixlm.runtime.quantization.gguf_blocks import PARSERS, AffinePlanes, parse_blocks
from radixlm.runtime.quantization.gguf_kquants import GROUP_PARSERS, group_codes
from radixlm.runtime.quantization.int4_cpu import Int4PackedWeight, int4_cpu_kernel_available, merge_planes

logger = logging.getLogger(__name__)

QUANTIZATION_CHOICES = ("auto", "none", "gguf", "fp8", "compressed-tensors", "awq", "gptq")


@dataclass(frozen=True)
class GGUFTensor:
    """One GGUF tensor's raw blocks, rows in HF order (Q/K permutation undone), not yet unpacked."""

    qtype: QType
    raw: np.ndarray  # uint8 [rows, bytes per row]
    shape: tuple[int, int]  # (rows, columns) of the weight
    # Where these blocks were read (file identity, tensor name, row slices): the packed-weight cache's key.
    origin: tuple[Hashable, ...] | None = field(default=None, compare=False)

    def planes(self) -> AffinePlanes:
        return parse_blocks(self.qtype, self.raw, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        import gguf

        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(self.raw, self.qtype), np.float32)).view(self.shape)

    def rows(self, start: int, count: int) -> "GGUFTensor":
        origin = None if self.origin is None else (*self.origin, start, count)
        return GGUFTensor(self.qtype, self.raw[start : start + count], (count, self.shape[1]), origin)


def resolve_quantization(choice: str, dtype: str, device: torch.device, gguf_blocks: bool,
                         parallel: bool, checkpoint: CheckpointQuantization | None = None, tp_size: int = 1) -> str:
    """'fp8' (FP8 W8A8: a checkpoint's as published, or quantized at load), 'gptq' / 'awq' / 'w4a16'
    (a 4-bit checkpoint's packed weights: GPTQ, AWQ, compressed-tensors pack-quantized), 'gguf' (GGUF
    blocks kept packed: on a CPU, or on a GPU when asked for: Q4_0 / Q4_1 / Q4_K 4-bit, Q8_0 / Q6_K int8) or 'none' (weights in the model dtype).

    A quantized checkpoint always loads as published (under none / auto too: its weights are); auto
    picks gguf for a GGUF checkpoint on a CPU unless --dtype was set explicitly, or the replica is
    split over ranks (the packed layout is not sliced per rank yet)."""
    if choice not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization: {choice!r} is not one of {', '.join(QUANTIZATION_CHOICES)}")
    if checkpoint is not None:
        if choice not in ("auto", "none", checkpoint.method) and not (choice == "fp8" and checkpoint.w4 is None):
            raise ValueError(f"quantization: {choice!r} does not match the checkpoint's quant_method {checkpoint.method!r}")
        if checkpoint.w4 is not None:
            if tp_size > 1:
                raise ValueError("quantization: 4-bit checkpoints load on one rank per replica for now (tp_size 1)")
            return checkpoint.w4.mode
        if tp_size > 1:
            raise ValueError("quantization: FP8 checkpoints load on one rank per replica for now (tp_size 1); "
                             "--quantization fp8 on an unquantized checkpoint works with TP")
        return "fp8"
    if choice in ("compressed-tensors", "awq", "gptq"):
        raise ValueError(f"quantization: {choice!r} needs a checkpoint whose quantization_config has quant_method "
                         f"{choice!r}; use fp8 to quantize this one at load")
    if choice == "fp8":
        return "fp8"
    if choice == "none":
        return "none"
    reasons = []
    if not gguf_blocks:
        reasons.append("the checkpoint is not a converted GGUF file")
    if device.type == "cuda" and choice == "auto":
        reasons.append("auto keeps GGUF weights 4-bit on a CPU only (--quantization gguf: Q4_0 / Q4_1 / Q4_K / Q8_0 / Q6_K on the GPU)")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        reasons.append("the GPU's 4-bit kernels need Triton")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"quantized GGUF matmuls run on a CPU or a CUDA GPU (device {device.type})")
    if parallel:
        reasons.append("tensor/pipeline parallel ranks load dequantized weights")
    if device.type == "cpu" and not int4_cpu_kernel_available():
        reasons.append(f"torch {torch.__version__} has no packed int4 CPU matmul")
    if choice == "auto" and dtype != "auto":
        reasons.append(f"--dtype {dtype} asks for unquantized weights")
    if not reasons:
        return "gguf"
    if choice == "gguf":
        raise ValueError(f"quantization: gguf is not possible here: {'; '.join(reasons)}")
    return "none"


_noted: set[tuple[str, str]] = set()


def _note_dequantized(parts: list[GGUFTensor], where: str) -> None:
    """Log once per mix of types that a layer of it loads dequantized (no kernel here takes it packed)."""
    key = ("+".join(sorted({p.qtype.name for p in parts})), where)
    if parts and key not in _noted:
        _noted.add(key)
        logger.info("gguf: layers of %s load dequantized on %s (no packed kernel for that type here)", *key)


def build_quantized_weight(parts: list[GGUFTensor], device: torch.device | None = None) -> QuantizedWeight | None:
    """The packed form of a layer whose checkpoint parts (stacked along the output rows: q, k, v /
    gate, up) are `parts`; None if some part's type has no plane layout (it loads dequantized).
    On a CUDA device: Q4_0 / Q4_1 / Q4_K layers for the Triton W4A16 kernels (`w4_gguf.py`), Q8_0 / Q6_K
    (alone or mixed with those) as int8 codes (`int8_weight.py`)."""
    if device is not None and device.type == "cuda":
        from radixlm.runtime.quantization.int8_weight import Int8Weight
        from radixlm.runtime.quantization.w4_gguf import w4_from_gguf

        packed = w4_from_gguf(parts, device)
        if packed is None and parts and all(p.qtype in GROUP_PARSERS for p in parts):
            packed = Int8Weight([group_codes(p.qtype, p.raw, p.shape[0]) for p in parts],
                                "gguf " + "+".join(sorted({p.qtype.name for p in parts})), device)
        if packed is None:
            _note_dequantized(parts, "the GPU")
        return packed
    if not parts or any(p.qtype not in PARSERS for p in parts):
        _note_dequantized(parts, "the CPU")
        return None
    key = None if any(p.origin is None for p in parts) else ("cpu", *(p.origin for p in parts))
    weight = packed_cache.lookup(key)  # the same file's weight, packed by another model of this process
    if weight is None:
        weight = Int4PackedWeight(merge_planes([p.planes() for p in parts]), "+".join(sorted({p.qtype.name for p in parts})))
        packed_cache.store(key, weight)
    return weight
