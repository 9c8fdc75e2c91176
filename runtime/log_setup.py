"""One log format for every process of the runtime: timestamp, process role, level, message.

The front (HTTP / Engine side), each scheduler and each extra rank call `configure_logging` once at
start; lines from all of them then interleave readably on one terminal:

    [2026-12-02 15:06:06 scheduler] INFO Decode batch. #running-req: 3, ...
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixlm.runtime.io_struct import SchedulerReady
    from radixlm.runtime.server_args import ServerArgs

LOG_FORMAT = "[%(asctime)s {role}] %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: str, role: str) -> None:
    """Root logging for this process; `role` names it in every line (server, scheduler, rank 1...)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT.format(role=role), datefmt=DATE_FORMAT, force=True)
    if level.lower() != "debug":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def startup_summary(model_name: str, ready: "SchedulerReady", args: "ServerArgs", seconds: float) -> str:
    """One line that says what was started: model, dtype, memory, graphs, layout, time."""
    sizes = ready.cuda_graph_batch_sizes
    graphs = f"{len(sizes)} CUDA graphs (batch {sizes[0]}-{sizes[-1]})" if sizes else "no CUDA graphs"
    layout = "" if args.tp_size * args.pp_size * args.dp_size == 1 else (
        f", TP {args.tp_size} x PP {args.pp_size} x DP {args.dp_size}")
    return (f"started {model_name} ({ready.architecture}) on {ready.device}, {ready.dtype}: weights "
            f"{ready.weights_bytes / 1e9:.2f} GB (quantization {ready.quantization}), KV pool {ready.max_total_tokens} "
            f"tokens ({ready.kv_bytes / 1e9:.2f} GB, {ready.kv_cache_dtype}), context {ready.context_len}, {ready.max_running_requests} "
            f"running requests max, {graphs}{layout}, grammar backend {args.grammar_backend}; "
            f"ready in {seconds:.1f} s")
