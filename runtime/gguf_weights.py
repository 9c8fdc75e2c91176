"""The weights of a converted GGUF folder with the quantized tensors kept as raw blocks.

The converter (gguf_convert.py) writes, beside the float32 safetensors, `gguf-blocks.st`: the raw
GGUF blocks of every tensor `runtime/quantization` has a packed layout for, in HF names and row
order. A quantized load takes those (`GGUFTensor`) and the float32 file only for the rest (norms,
biases, tensors of other types); the float32 copies of the quantized tensors are never read.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors import safe_open

from radixlm.runtime.gguf_convert import GGUF_BLOCKS_FILE
from radixlm.runtime.quantization.select import GGUFTensor
from radixlm.runtime.weight_loader import iter_safetensors


def has_gguf_blocks(model_dir: Path) -> bool:
    return (Path(model_dir) / GGUF_BLOCKS_FILE).is_file()


def iter_gguf_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
    """(HF name, GGUFTensor) for each tensor kept in blocks, then (HF name, float32 tensor) for the rest."""
    path = Path(model_dir) / GGUF_BLOCKS_FILE
    stat = path.stat()
    file_id = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with safe_open(str(path), framework="np") as f:
        types = f.metadata() or {}
        names = set(f.keys())
        for name in sorted(names):
            qtype, _, columns = types[name].partition(":")
            raw = np.asarray(f.get_tensor(name), dtype=np.uint8)
            yield name, GGUFTensor(QType[qtype], raw, (int(raw.shape[0]), int(columns)), (*file_id, name))
    for name, tensor in iter_safetensors(model_dir, lazy=True):
        if name not in names:
            yield name, tensor[:]
