"""`radixlm serve|bench [options]`: the command line, built from the ServerArgs flag declarations.

Every value is checked before anything loads; a bad one is a one-line error and exit code 2.
`--config FILE` (YAML or JSON) sets options; flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from radixlm.runtime.flag_spec import GROUPS, FlagSpec
from radixlm.runtime.server_args import ServerArgs, flag_specs

USAGE_ERROR = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage of ~50 flags would bury it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("radixlm")
    except PackageNotFoundError:
        return "unknown"


def _help_text(spec: FlagSpec) -> str:
    text = spec.help
    default = spec.describe_default()
    if default is not None:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_server_flags(parser: argparse.ArgumentParser, title_prefix: str = "") -> None:
    """Every ServerArgs option as a flag, in its group. Only flags actually given appear in the
    parsed namespace (default=SUPPRESS), so they can override a config file."""
    groups = {name: parser.add_argument_group(title_prefix + title) for name, title in GROUPS.items()}
    for spec in flag_specs():
        group = groups[spec.group]
        names = [spec.flag, *spec.aliases]
        if spec.type is bool:
            group.add_argument(*names, dest=spec.name, action="store_true", default=argparse.SUPPRESS,
                               help=_help_text(spec))
            continue
        convert = str.lower if spec.name == "log_level" else spec.type
        group.add_argument(*names, dest=spec.name, type=convert, choices=spec.choices, default=argparse.SUPPRESS,
                           metavar=None if spec.choices else spec.name.upper(), help=_help_text(spec),
                           nargs="+" if spec.multiple else None)


def build_serve_parser(prog: str) -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog=prog, description="Start the radixlm HTTP server: SGLang's native API and the OpenAI-compatible API.",
        epilog="Options can also come from --config FILE (YAML keys are the option names, e.g. "
               "'max_total_tokens: 16384'); flags on the command line override the file.")
    parser.add_argument("--version", action="version", version=f"radixlm {package_version()}")
    parser.add_argument("--config", metavar="FILE", help="read options from a YAML (or JSON) file")
    add_server_flags(parser)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML or JSON mapping; keys may use dashes or underscores. Raises ValueError."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--config: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"--config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option: value")
    known = {spec.name: spec for spec in flag_specs()}
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).removeprefix("--").replace("-", "_")
        spec = known.get(name)
        if spec is None:
            raise ValueError(f"--config: unknown option {key!r} in {path}")
        if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        options[name] = value
    return options


def parse_server_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> ServerArgs:
    """Flags over the config file over the defaults, validated; a bad value exits with a one-line error."""
    given = vars(parser.parse_args(argv))
    config = given.pop("config", None)
    try:
        options = load_config_file(config) if config else {}
        options.update(given)
        return ServerArgs(**options)
    except ValueError as exc:
        flag_error(parser, exc)


def flag_error(parser: argparse.ArgumentParser, exc: ValueError) -> NoReturn:
    parser.error(_flag_message(str(exc)))


def _flag_message(message: str) -> str:
    """'max_total_tokens: ...' -> '--max-total-tokens: ...' (the spelling the user typed)."""
    name, sep, rest = message.partition(": ")
    if sep and name.isidentifier() and any(spec.name == name for spec in flag_specs()):
        return f"--{name.replace('_', '-')}: {rest}"
    return message


def serve(argv: list[str] | None, prog: str) -> int:
    parser = build_serve_parser(prog)
    args = parse_server_args(parser, argv)
    try:
        args = args.resolve()  # device, kernels, grammar backend: checked before the model loads
    except ValueError as exc:
        flag_error(parser, exc)
    if args.node_rank > 0:  # another node of a multi-node replica: its ranks only, no HTTP
        from radixlm.runtime.log_setup import configure_logging
        from radixlm.runtime.parallel.launch import run_worker_node

        configure_logging(args.log_level, f"node {args.node_rank}")

        return run_worker_node(args)
    from radixlm.runtime.server.app import run_server

    return run_server(args)


COMMANDS = {"serve": "start the HTTP server", "bench": "benchmarks: serving | offline | constrained"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"radixlm {package_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print("usage: radixlm <command> [options]\n\ncommands:", file=out)
        for name, doc in COMMANDS.items():
            print(f"  {name:10s} {doc}", file=out)
        print("\n`radixlm serve --help` lists the server's options; `radixlm --version` prints the version",
              file=out)
        return 0 if out is sys.stdout else USAGE_ERROR
    if argv[0] == "bench":
        from radixlm.runtime.bench.cli import bench_main

        return bench_main(argv[1:])
    return serve(argv[1:], prog="radixlm serve")


if __name__ == "__main__":
    sys.exit(main())
