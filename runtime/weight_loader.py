"""Stream tensors out of a Hugging Face folder's (possibly sharded) safetensors files."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def iter_safetensors(model_dir: str | Path, lazy: bool = False) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every checkpoint tensor. `lazy`: a safetensors slice instead, read only when
    indexed (`s[a:b]`, `s[:, a:b]`, `s[:]`): a tensor-parallel rank reads just its share of each
    tensor, a pipeline stage skips the other stages' layers."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_path: no *.safetensors files in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights for `--load-format dummy`: speed does not depend on values."""
    gen: torch.Generator | None = None
    for name, p in model.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        std = 1.0 / max(p.shape[-1], 1) ** 0.5
        p.data.normal_(0.0, std, generator=gen)  # on the parameter's own device: fast for 8B models
