"""The CPU decode step's C kernels (`cpu_decode_kernels.c`), built on first use (issue 20).

torch has no paged attention on the CPU: the torch path gathers every row's K/V into a fresh
[B, L, H, D] copy per layer (at batch 32, 128-token prompts: ~7 MB a layer, most of a 2-core step's
attention time), then runs SDPA. The C kernel reads the pool in place. The layer's small ops
(RMSNorm, add + RMSNorm, rotary, SiLU-and-mul) are one call each there, where torch dispatches
several ops of a few microseconds each (a batch-1 step is mostly such dispatches). It is compiled once per
machine with the system C compiler (`cc -O3 -march=native -fopenmp`) into the radixlm cache
(`$RADIXLM_CACHE_DIR` or ~/.cache/radixlm, under `kernels/`), keyed by the source, the compiler
and the CPU's feature flags, and loaded with ctypes. Without a compiler, or if the build fails,
`decode_kernels_library()` is None and the CPU bundle keeps the torch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_decode_kernels.c", "cpu_int4_gemv.c", "cpu_int8_gemv.c",
                                                                "cpu_decode_stack.c"))
# -ffp-contract=off: no fused multiply-adds, so rotary stays bit for bit equal to the reference.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
_P, _I64, _F, _N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def kernel_cache_dir() -> Path:
    root = os.environ.get("RADIXLM_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "radixlm") / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (a -march=native build must not be loaded on another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders each land a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def decode_kernels_library() -> ctypes.CDLL | None:
    """The compiled kernels (built now if this machine has no copy yet), or None where none can be built."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("no C compiler: the CPU decode step stays on torch ops")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join((*(s.read_text() for s in SOURCES), version, " ".join(FLAGS), _cpu_flags())).encode())
        target = kernel_cache_dir() / f"cpu_decode_kernels-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("CPU decode kernels unavailable (%s): using torch ops", exc)
        return None
    signatures = {
        "radixlm_decode_attention_f32": ([_P, _P, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _F, _P, _N], ctypes.c_int),
        "radixlm_rms_norm_f32": ([_P, _I64, _P, _F, _P, _I64, _I64, _N], None),
        "radixlm_add_rms_norm_f32": ([_P, _I64, _P, _I64, _P, _F, _P, _P, _I64, _I64, _N], None),
        "radixlm_rotary_f32": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _N], None),
        "radixlm_silu_mul_f32": ([_P, _I64, _P, _I64, _I64, _N], None),
        "radixlm_int4_gemv": ([_P, _I64, _I64, _P, _I64, _I64, _I64, _P, _N], ctypes.c_int),
        "radixlm_int8_gemv": ([_P, _I64, _I64, _P, _I64, _I64, _P, _N], ctypes.c_int),
        "radixlm_decode_stack": ([_P, _I64, _P, _P, _P], ctypes.c_int),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib
