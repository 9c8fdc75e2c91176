"""Entry point of the scheduler process: load the model, then loop receive -> step -> send."""
from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from radixlm.runtime.fault_isolation import SchedulerFatalError, reject_message
from radixlm.runtime.grammar_warmup import start as start_grammar_warmup
from radixlm.runtime.io_struct import AbortReq, ControlReq, SchedulerFailed, SchedulerReady
from radixlm.runtime.log_setup import configure_logging
from radixlm.runtime.parallel.state import RankInfo
from radixlm.runtime.server_args import ServerArgs

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)
FATAL_EXIT_CODE = 3  # the scheduler stopped itself (SchedulerFatalError), after telling the front why


def take_messages(sched: Scheduler, msgs: list[object], send: Connection) -> bool:
    """One turn's messages, in order, each answered on `send` where it has an answer; a run of consecutive
    aborts (abort_all sends one per request) is taken in one pass. False: a shutdown came."""
    aborts: list[AbortReq] = []
    for msg in msgs:
        if isinstance(msg, AbortReq):
            aborts.append(msg)
            continue
        if aborts:
            _abort(sched, aborts)
            aborts = []
        if isinstance(msg, ControlReq) and msg.kind == "shutdown":
            return False
        try:
            resp = sched.handle(msg)
        except Exception as exc:  # noqa: BLE001 - fail that request alone
            resp = reject_message(sched, msg, exc)
        if resp is not None:
            send.send(resp)
    if aborts:
        _abort(sched, aborts)
    return True


def _abort(sched: Scheduler, aborts: list[AbortReq]) -> None:
    """A run of consecutive aborts taken in one pass (abort_all sends one per request)."""
    try:
        sched.abort_many(aborts)
    except Exception as exc:  # noqa: BLE001 - as any message the scheduler fails to take in
        reject_message(sched, aborts[-1], exc)


def load_tokenizer(path: str | Path) -> object:
    """The HF tokenizer (importing transformers and building it takes seconds: logged)."""
    started = time.monotonic()
    logger.info("loading the tokenizer from %s", path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    logger.info("tokenizer ready in %.1f s (%d tokens)", time.monotonic() - started, len(tokenizer))
    return tokenizer


def freeze_startup_heap() -> int:
    """Move every object alive after start-up (model, tokenizer, CUDA graphs' Python side: ~380k
    tracked objects) out of the cyclic collector's reach. A full collection walks them all — 0.7 s
    on the 2-core CPU, ~0.28 s measured inside one item (f) run on the H200 (f_timeline, 16:55) —
    and the decode loop's allocations trigger one now and then; a constrained run, which allocates
    more per row and step, more often. What start-up built lives as long as the process anyway.
    Returns how many objects were frozen, counted once here: `gc.get_freeze_count()` walks the whole
    frozen list (40-60 ms for ~300k objects on the 2-core CPU), never a call for the decode loop."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_scheduler_process(args: ServerArgs, model_dir: str, recv: Connection, send: Connection,
                          rank: RankInfo | None = None) -> None:
    """`rank`: this is rank 0 of a replica with several ranks (TP / PP); it drives the others."""
    configure_logging(args.log_level, mp.current_process().name.removeprefix("radixlm-"))  # scheduler[-N]
    # A terminal's Ctrl-C reaches the whole process group: the front process handles it and stops
    # us through the pipe, so our exit is an orderly one rather than a crash it must report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    started = time.monotonic()
    try:
        from radixlm.runtime.scheduler import Scheduler

        if rank is not None:
            from radixlm.runtime.parallel.state import init_parallel

            init_parallel(rank, args.device)  # joins the replica's other ranks; picks this rank's GPU
        elif args.device and args.device.startswith("cuda:"):
            import torch

            torch.cuda.set_device(args.device)  # e.g. one GPU per data-parallel replica
        tokenizer = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or model_dir)
        grammar_warmup = start_grammar_warmup(args, tokenizer)  # beside the model's load
        sched = Scheduler(args, Path(model_dir), tokenizer)
        if grammar_warmup is not None:
            grammar_warmup.join()  # the loop never builds the tokenizer's grammar side (grammar_warmup.py)
        runner = sched.runner
        graphs = runner.graph_runner
        sched.frozen_objects = freeze_startup_heap()
        if runner.lora is not None:
            from radixlm.runtime.lora.background_load import AdapterLoads

            sched.adapter_loads = AdapterLoads(runner.lora)
        send.send(SchedulerReady(
            model_path=model_dir, max_total_tokens=runner.max_total_tokens,
            max_running_requests=runner.max_running_requests, context_len=runner.context_len,
            vocab_size=runner.vocab_size, device=str(runner.device), dtype=str(runner.dtype).removeprefix("torch."),
            architecture=runner.model_config.architecture, weights_bytes=runner.weights_bytes,
            kv_bytes=runner.kv_pool_bytes, cuda_graph_batch_sizes=tuple(graphs.buckets) if graphs else (),
            quantization=runner.quantization, kv_cache_dtype=str(runner.kv_cache_dtype).removeprefix("torch."),
            load_seconds=time.monotonic() - started,
        ))
    except Exception:  # noqa: BLE001 - report any startup failure to the parent verbatim
        send.send(SchedulerFailed(traceback.format_exc()))
        return
    from radixlm.runtime.loop_stats import LoopStats

    loop = LoopStats.from_env()  # RADIXLM_LOOP_STATS: benchmarks' view of this loop (else None)
    if loop is not None:
        loop.watch_scheduler(sched)
    try:
        while True:
            if sched.adapter_loads is not None:
                for resp in sched.adapter_loads.finished():
                    send.send(resp)
            # Block only when idle; otherwise just drain what has arrived.
            loading = sched.adapter_loads is not None and sched.adapter_loads.pending
            if sched.idle and not recv.poll(0.01 if loading else 0.5):
                if os.getppid() != parent:
                    return
                continue
            if loop is not None:
                loop.begin(sched.stats)
                t0 = time.perf_counter()
            drained: list[object] = []
            while recv.poll():
                received = recv.recv()  # one message, or a list of them (the front coalesces bursts)
                drained.extend(received if isinstance(received, list) else [received])
            if not take_messages(sched, drained, send):
                return
            if loop is not None:
                t1 = time.perf_counter()
            ran = sched.step()
            if loop is not None:
                t2 = time.perf_counter()
            outputs = sched.pop_outputs()
            if outputs:
                send.send(outputs)
            if loop is not None:
                t3 = time.perf_counter()
            if not ran and not outputs:
                recv.poll(0.002)  # only waiting on grammar compiles: don't spin
            if loop is not None:
                loop.add("receive", t1 - t0)
                loop.add("step", t2 - t1)
                loop.add("send", t3 - t2)
                loop.add("wait", time.perf_counter() - t3)
                loop.turn(ran, t2 - t1)
                if sched.idle:
                    loop.end(sched.stats)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    except SchedulerFatalError as exc:
        # The device or the pools are in an unknown state: stop; the front fails every request
        # with this reason (503) and /health reports it.
        logging.getLogger(__name__).critical("%s; the scheduler stops", exc, exc_info=exc)
        try:
            send.send(SchedulerFailed(str(exc)))
        except (OSError, ValueError):
            pass
        os._exit(FATAL_EXIT_CODE)  # (skips the finally below: a collective may hang on a broken device)
    finally:
        if runner.channel is not None:
            from radixlm.runtime.parallel.state import destroy_parallel

            runner.channel.stop()  # the other ranks exit too
            destroy_parallel()
