"""Programmatic dependent launch (PDL) for the decoder's small Triton kernels.

Inside a CUDA graph a batch-1 decode layer is ~13 kernels, most of them a few microseconds long;
each one pays its launch, the rasterization of its programs and its first memory round trip after
the previous kernel has fully drained. With PDL (sm_90+) a kernel is launched while its predecessor
still runs: its programs become resident and wait at `griddepcontrol.wait` until the predecessor
has completed and its writes are visible, so the launch overlaps the predecessor's work.

The rules that keep this exact. A kernel launched with PDL first lets its own dependent launch
(`trigger`), may then load what is constant for the whole step — weights, the rotary table, and the
step's inputs (positions, KV slots, sequence lengths, req_to_token), which were written before the
decode graph, or before the forward, by work that finished before the layer's last cuBLAS GEMM, the
point every chain of PDL kernels starts from — and calls `wait` before any other global access (not
only before reading its inputs: the allocator may hand it memory the predecessor still reads, so no
store comes before it either). Every program executes `wait`, even one with nothing to do, so a
kernel's completion implies its predecessor's. The arithmetic is untouched: the results are
bit-identical with PDL on or off. Kernels launched without it (cuBLAS, torch's) wait for everything
before them, as always.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def trigger(USE_PDL: tl.constexpr):
    """First statement of a PDL-capable kernel: the next kernel may launch now (its programs then wait in
    their own `wait`). A no-op when USE_PDL is False (the CPU interpreter)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Block until the predecessor grid has completed and its writes are visible; before any global
    access but the step-constant loads (module docstring). A no-op when USE_PDL is False."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


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


AUTO_ON = True  # --decode-pdl auto: on (H200, 2026-12-03: small-kernel chain -1.7 µs a layer, same bits; RESULTS.md)


def enabled(mode: str, device: torch.device) -> bool:
    """--decode-pdl `mode` (auto / on / off) on `device`: whether the decoder's kernels launch with PDL.
    Never where the device lacks it (a CPU, or a GPU older than sm_90), whatever the mode."""
    if mode == "off" or (mode == "auto" and not AUTO_ON):
        return False
    return supported(device)
