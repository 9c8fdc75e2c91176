"""`radixlm bench serving|offline|constrained [options]`: argument parsing and the three runs.

Engine / server options are the `radixlm serve` flags (same names, same checks); a benchmark's own
options come first in --help."""
from __future__ import annotations

import argparse
import asyncio
from typing import Any

from radixlm.runtime.cli import OneLineErrorParser, add_server_flags, flag_error
from radixlm.runtime.server_args import ServerArgs, flag_specs

ENGINE_TITLE = "engine: "


def _parser() -> OneLineErrorParser:
    top = OneLineErrorParser(prog="radixlm bench", description="Benchmarks with an SGLang-style summary table "
                             "and JSON output.")
    sub = top.add_subparsers(dest="which", required=True, metavar="{serving,offline,constrained}",
                             parser_class=OneLineErrorParser)
    serving = sub.add_parser("serving", help="load a server over HTTP (started here unless --base-url)")
    serving.add_argument("--base-url", help="benchmark this running server instead of starting one")
    serving.add_argument("--num-requests", type=int, default=64)
    serving.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    serving.add_argument("--output-len", type=int, default=64, help="generated tokens per request (ignore_eos)")
    serving.add_argument("--request-rate", type=float, default=float("inf"),
                         help="Poisson arrivals per second (default: inf, all at once)")
    serving.add_argument("--max-concurrency", type=int, default=None)
    serving.add_argument("--warmup", type=int, default=1)
    serving.add_argument("--seed", type=int, default=0)
    serving.add_argument("--request-timeout", type=float, default=1800)
    serving.add_argument("--startup-timeout", type=float, default=600)
    offline = sub.add_parser("offline", help="Engine prefill / decode throughput (no HTTP)")
    offline.add_argument("--num-prompts", type=int, default=32)
    offline.add_argument("--input-len", type=int, default=128)
    offline.add_argument("--output-len", type=int, default=65)
    offline.add_argument("--seed", type=int, default=0)
    constrained = sub.add_parser("constrained", help="JSON-schema generation vs the same prompts unconstrained")
    constrained.add_argument("--num-requests", type=int, default=48)
    constrained.add_argument("--max-new-tokens", type=int, default=128)
    constrained.add_argument("--skip-unconstrained", action="store_true", help="no side-by-side baseline run")
    for p in (serving, offline, constrained):
        p.add_argument("--output-file", help="write the figures and the run's configuration as JSON here")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        add_server_flags(p, ENGINE_TITLE)
    return top


def _split(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the benchmark's own options, the server options given)."""
    names = {spec.name for spec in flag_specs()}
    values = vars(ns)
    return ({k: v for k, v in values.items() if k not in names}, {k: v for k, v in values.items() if k in names})


def bench_main(argv: list[str]) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)
    own, server = _split(ns)
    try:
        args = ServerArgs(**server)  # every engine value checked before anything starts
    except ValueError as exc:
        flag_error(parser, exc)
    from radixlm.runtime.log_setup import configure_logging

    configure_logging(args.log_level, "bench")
    progress = not own.pop("no_progress")
    output_file = own.pop("output_file")
    which = own.pop("which")
    return {"serving": _serving, "offline": _offline, "constrained": _constrained}[which](
        own, server, args, progress, output_file)


def _serving(own: dict[str, Any], server: dict[str, Any], args: ServerArgs, progress: bool,
             output_file: str | None) -> int:
    from radixlm.runtime.bench.report import write_record
    from radixlm.runtime.bench.serving import make_workload, run_load, serving_table, start_server, stop_server

    proc = None
    url = own["base_url"]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    if url is None:
        flags = []
        for spec in flag_specs():
            if spec.name in server and spec.name not in ("host", "port", "log_level"):
                value = server[spec.name]
                flags += [spec.flag] if spec.type is bool else [spec.flag, str(value)]
        proc, url, _ = start_server(flags, own["startup_timeout"])
    try:
        info = asyncio.run(_get_json(url + "/get_server_info", headers))
        workload = make_workload(own["num_requests"], own["input_len"], own["output_len"], own["seed"],
                                 int(info.get("vocab_size", 32000)))
        result = asyncio.run(run_load(url, workload, request_rate=own["request_rate"],
                                      max_concurrency=own["max_concurrency"], warmup=own["warmup"], seed=own["seed"],
                                      request_timeout=own["request_timeout"], headers=headers, progress=progress))
    finally:
        if proc is not None:
            stop_server(proc)
    print(serving_table(result, own["request_rate"], own["max_concurrency"]))
    write_record(output_file, "serving", {**own, **server}, result)
    return 0 if result["failed"] == 0 else 1


async def _get_json(url: str, headers: dict[str, str] | None) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(url) as r:
            return await r.json() if r.status == 200 else {}


def _offline(own: dict[str, Any], server: dict[str, Any], args: ServerArgs, progress: bool,
             output_file: str | None) -> int:
    import radixlm
    from radixlm.runtime.bench.offline import measure, offline_table
    from radixlm.runtime.bench.report import write_record

    n, inp, out = own["num_prompts"], own["input_len"], own["output_len"]
    server.setdefault("max_running_requests", max(n, 8))
    server.setdefault("skip_tokenizer_init", True)  # token ids in, token ids out
    with radixlm.Engine(**server) as engine:
        info = engine.tokenizer_manager.info
        result = measure(engine, n, inp, out, info.vocab_size, own["seed"], progress)
        meta = {"device": info.device, "dtype": info.dtype}
    print(offline_table(result, meta))
    write_record(output_file, "offline", {**own, **server}, {**result, **meta})
    return 0


def _constrained(own: dict[str, Any], server: dict[str, Any], args: ServerArgs, progress: bool,
                 output_file: str | None) -> int:
    import radixlm
    from radixlm.runtime.bench.constrained import SCHEMAS, constrained_table, make_requests, run
    from radixlm.runtime.bench.report import write_record

    with radixlm.Engine(**server) as engine:
        backend = engine.server_args.grammar_backend
        requests = make_requests(engine, own["num_requests"])
        # Warm-up: the grammar worker starts and each schema compiles once (cached afterwards).
        run(engine, requests[:len(SCHEMAS)], 8, constrained=True, progress=False)
        unconstrained = None
        if not own["skip_unconstrained"]:
            engine.flush_cache()  # both runs start without the prompts in the prefix cache
            unconstrained = run(engine, requests, own["max_new_tokens"], constrained=False, progress=progress)
        engine.flush_cache()
        constrained = run(engine, requests, own["max_new_tokens"], constrained=True, progress=progress)
    print(constrained_table(constrained, unconstrained, str(backend)))
    write_record(output_file, "constrained", {**own, **server},
                 {"constrained": constrained, "unconstrained": unconstrained, "grammar_backend": backend})
    return 0 if constrained["errors"] == 0 else 1
