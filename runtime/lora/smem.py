"""Shared memory of the LoRA kernels' tiles: an upper bound per launch, and the device's limit.

Triton stages a dot's operands in shared memory and, in a software-pipelined loop, keeps several
copies of each tile it loads; a launch that needs more than the device allows fails at its first
call (`OutOfResources`). On the H200 the one-launch kernel with K tiles of 1,024 in float32 asked
for 263,168 B of 232,448 (2 x (16 + 16) x 1,024 x 4 + 1,024: two pipeline buffers of the x and A
tiles, plus y). The tile rules (`sgmv_triton.tiles`, `sgmv_fused.fused_tiles`) shrink their tiles
until these bounds fit the device's limit, so that no rank, dtype or token count can ask for more.

The bounds count `stages` buffers of every tile a loop loads (Triton keeps num_stages - 1), each
dot's operands once, and a float32 [M, N] tile for a layout change; what Triton 3.6 allocates for
sm_90 is at or below them (benchmarks/compile_check_lora.py compiles the tiles and compares).
Pure Python: the rules run the same on a CPU (the interpreter) as on the GPU.
"""
from __future__ import annotations

import functools

import torch

SM90_SMEM = 232448  # max shared memory per block (opt-in) of sm_90 (H100 / H200): the CPU path's limit
DEFAULT_STAGES = 3  # Triton's num_stages on CUDA when a launch does not set it


@functools.cache
def _cuda_smem(index: int) -> int:
    import triton

    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def device_smem(device: torch.device) -> int:
    """The most shared memory one program may use on `device` (Triton's own limit on CUDA)."""
    if device.type != "cuda":
        return SM90_SMEM
    return _cuda_smem(device.index if device.index is not None else torch.cuda.current_device())


def loop_bytes(rows: int, cols: int, block_k: int, elt: int, stages: int | None) -> int:
    """A pipelined reduction loading a [rows, block_k] and a [cols, block_k] tile each step."""
    return (stages or DEFAULT_STAGES) * (rows + cols) * block_k * elt


def dot_bytes(m: int, n: int, r: int, elt: int) -> int:
    """One dot [m, r] x [r, n] outside a loop: both operands, and the float32 result re-laid out."""
    return (m + n) * r * elt + m * n * 4
