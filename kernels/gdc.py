"""Programmatic dependent launch (PDL) for the decoder's small Triton kernels.

Inside a CUDA graph a batch-1 decode layer is ~13 kernels, most of them a few microseconds long;
each one pays its launch, the rasterization of its programs and its first memory round trip after
the previous kernel has fully drained. With PDL (sm_90+) a kernel is launched while its predecessor
still runs: its programs become resident and wait at `griddepcontrol.wait` until the predecessor
has completed and its writes are visible, so the launch overlaps the predecessor's work.

The rule that keeps this exact: a kernel launched with PDL executes `enter(USE_PDL)` first, before it
touches any global memory (not only before reading its inputs: the allocator may hand it memory the
predecessor still reads), then lets its own dependent launch. The arithmetic is untouched, so the
results are bit-identical with PDL on or off. Kernels launched without it (cuBLAS, torch's) simply
wait for everything before them, as always.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def enter(USE_PDL: tl.constexpr):
    """First statement of a PDL-capable kernel: wait for the predecessor grid (complete, writes
    visible), then allow the next kernel to launch. A no-op when USE_PDL is False (CPU interpreter)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def supported(device: torch.device) -> bool:
    """PDL needs a CUDA device of compute capability 9.0 (Hopper) or newer."""
    if device.type != "cuda":
        return False
    return _device_supports(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(pdl: bool, device: torch.device) -> dict:
    """Keyword arguments of a kernel launch: (USE_PDL, launch_pdl) when `pdl` and the device has PDL,
    else USE_PDL=False alone (the CPU interpreter takes no launch_pdl)."""
    if pdl and supported(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


# --decode-pdl auto: on for bf16 models too. On the H200 (RESULTS.md, 2026-12-03) this form won 1.7 µs a layer on the
# small kernels alone (07:31); with the M = 1 GEMV on all four projections (its "pf" configs load their first weight
# tile before the wait) batch-1 decode went 233.1 -> 236.3 tok/s (14:47), and each GEMV after its producer 0.7-1.6 µs
# faster. A variant that let the next kernel launch before its own wait (loading the step's constants) lost 3.5%.
AUTO_ON = True
# ... and on for models with quantized linears (their batch-1 kernels take PDL too, `set_decode_pdl`): batch-1
# decode of the 8B shape on the H200 (12:00 round, RESULTS.md) w4a16 374.4 -> 403.7 tok/s, fp8 330.3 -> 352.0.
AUTO_ON_QUANTIZED = True


def enabled(mode: str, device: torch.device, quantized: bool = False) -> bool:
    """--decode-pdl `mode` (auto / on / off) on `device`: whether the decoder's kernels launch with PDL
    (`quantized`: the model has quantized linears). Never where the device lacks it (a CPU, or a GPU older
    than sm_90), whatever the mode."""
    if mode == "off" or (mode == "auto" and not (AUTO_ON_QUANTIZED if quantized else AUTO_ON)):
        return False
    return supported(device)
