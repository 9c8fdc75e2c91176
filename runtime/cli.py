"""`radixlm serve [options]`: the HTTP server, with SGLang's flag names (see ServerArgs)."""
from __future__ import annotations

import argparse
import sys

from radixlm.runtime.server_args import ServerArgs


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--max-inflight-requests", type=int, default=None,
                        help="at most this many sequences (prompts x n) accepted at once; more get HTTP 503 "
                             "(default: 4 x the scheduler's max running requests)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accepted for SGLang compatibility; radixlm never runs model code from the hub")


def server_args_from(ns: argparse.Namespace) -> ServerArgs:
    extra = {}
    if ns.max_inflight_requests is not None:
        if ns.max_inflight_requests <= 0:
            raise ValueError("max_inflight_requests: must be positive")
        extra["max_inflight_requests"] = ns.max_inflight_requests
    return ServerArgs.from_cli_args(ns).replace(extra=extra)


def serve(argv: list[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Start the radixlm HTTP server (native SGLang API "
                                     "and OpenAI-compatible API).")
    add_server_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        args = server_args_from(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if args.node_rank > 0:  # another node of a multi-node replica: its ranks only, no HTTP
        from radixlm.runtime.parallel.launch import run_worker_node

        return run_worker_node(args)
    from radixlm.runtime.server.app import run_server

    return run_server(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": "start the HTTP server"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: radixlm <command> [options]\n\ncommands:")
        for name, doc in commands.items():
            print(f"  {name:10s} {doc}")
        print("\nrun `radixlm serve --help` for the server's options")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return serve(argv[1:], prog="radixlm serve")


if __name__ == "__main__":
    sys.exit(main())
