"""The CLI without a running server: help, --version, --config, and every bad value refused with a
one-line error (exit code 2) before the model loads."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys

import pytest

from radixlm.runtime import cli
from radixlm.runtime.flag_spec import GROUPS
from radixlm.runtime.server_args import ServerArgs, flag_specs


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if serve() gets as far as starting the server (which loads the model)."""
    from radixlm.runtime.server import app

    def refuse(args):
        raise AssertionError("the server was started: the bad value was not caught up front")

    monkeypatch.setattr(app, "run_server", refuse)


def _serve_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("radixlm serve: error: "), err
    assert "Traceback" not in err
    return err


BAD_VALUES = [
    (["--dtype", "float33"], "--dtype"),
    (["--attention-backend", "bogus"], "--attention-backend"),
    (["--log-level", "bogus"], "--log-level"),
    (["--port", "abc"], "--port"),
    (["--port", "-5"], "--port"),
    (["--max-total-tokens", "0"], "--max-total-tokens"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    (["--schedule-policy", "nonsense"], "--schedule-policy"),
    (["--tp-size", "0"], "--tp-size"),
    (["--nnodes", "2"], "--dist-init-addr"),
    (["--device", "tpu"], "--device"),
    (["--enable-torch-compile"], "--enable-torch-compile"),  # the flag that only raised is gone
    (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("argv,flag", BAD_VALUES, ids=[a[0] for a, _ in BAD_VALUES])
def test_bad_values_are_one_line_errors(capsys, no_model_load, argv, flag):
    assert flag in _serve_error(capsys, *argv)


def test_machine_dependent_values_are_checked_at_start(capsys, monkeypatch, no_model_load):
    import torch

    if not torch.cuda.is_available():
        # A machine with neither CUDA nor the Triton CPU interpreter, which is what accepts triton on a
        # CPU; tests/conftest.py sets TRITON_INTERPRET=1 for the whole session where CUDA is absent.
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert "--device" in _serve_error(capsys, "--device", "cuda")
        assert "--attention-backend" in _serve_error(capsys, "--attention-backend", "triton")
    missing = [b for b, module in (("xgrammar", "xgrammar"), ("outlines", "outlines_core"))
               if importlib.util.find_spec(module) is None]
    if missing:
        err = _serve_error(capsys, "--grammar-backend", missing[0])
        assert "--grammar-backend" in err and "not installed" in err


def test_dtype_error_from_the_command_line():
    """The exact case of the issue, end to end: no traceback, exit code 2."""
    r = _run("-m", "radixlm.launch_server", "--dtype", "float33")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--dtype" in r.stderr and "float33" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_fails_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = _run("-m", "radixlm.launch_server", "--port", str(port), "--model-path", str(tmp_path / "never-read"))
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert "never-read" not in r.stderr  # the model path was never looked at


def test_unknown_model_path_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    r = _run("-m", "radixlm.launch_server", "--model-path", str(missing), "--port", "0")
    assert r.returncode != 0
    assert "does not exist" in r.stderr and str(missing) in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_template_file_is_checked(tmp_path):
    r = _run("-m", "radixlm.launch_server", "--chat-template", "/no/such/template.jinja", "--port", "0")
    assert r.returncode == 2 and "chat-template" in r.stderr


def test_every_flag_is_documented_and_grouped(capsys):
    names = [spec.name for spec in flag_specs()]
    assert len(names) == len(set(names))
    for spec in flag_specs():
        assert spec.help and spec.group in GROUPS, spec.name
        assert spec.type in (str, int, float, bool), spec.name
        if spec.type is not bool and spec.default is None:
            assert spec.default_text, f"{spec.name}: say what the default is"
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for title in GROUPS.values():
        assert f"\n{title}:" in out, title
    for spec in flag_specs():
        assert spec.flag in out, spec.flag
    assert "(default: 16384)" in out  # --max-prefill-tokens
    assert "{auto,bfloat16,float16,half,float32,float}" in out
    for flag in ("--config", "--version", "--model", "--tensor-parallel-size"):
        assert flag in out


def test_version_and_command_usage(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("radixlm ")
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("radixlm ")
    assert cli.main(["bogus"]) == 2
    assert "serve" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out


def _parse(*argv: str) -> ServerArgs:
    return cli.parse_server_args(cli.build_serve_parser("radixlm serve"), list(argv))


def test_config_file_and_flag_precedence(tmp_path, capsys):
    config = tmp_path / "server.yaml"
    config.write_text("max-total-tokens: 12345\nport: 1234\nmem_fraction_static: 0.5\n"
                      "disable_radix_cache: true\nschedule_conservativeness: 2\n")
    args = _parse("--config", str(config), "--port", "4321")
    assert args.port == 4321  # the flag wins
    assert args.max_total_tokens == 12345 and args.mem_fraction_static == 0.5  # the file fills the rest
    assert args.disable_radix_cache is True and args.schedule_conservativeness == 2.0
    assert args.dtype == "auto"  # neither: the default
    as_json = tmp_path / "server.json"
    as_json.write_text(json.dumps({"dp_size": 2}))
    assert _parse("--config", str(as_json)).dp_size == 2
    for text, message in [("bogus_option: 1\n", "unknown option 'bogus_option'"),
                          ("max_total_tokens: lots\n", "--max-total-tokens: 'lots' is not an integer"),
                          ("dtype: float33\n", "--dtype"), ("- a list\n", "mapping"), ("a: [\n", "not valid YAML")]:
        config.write_text(text)
        with pytest.raises(SystemExit) as info:
            _parse("--config", str(config))
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        _parse("--config", str(tmp_path / "missing.yaml"))
    assert "cannot read" in capsys.readouterr().err


def test_resolve_fills_device_defaults_in_one_place():
    cpu = ServerArgs(dp_size=2).resolve("cpu")
    assert cpu.resolved and cpu.device == "cpu" and cpu.attention_backend == "torch"
    assert cpu.chunked_prefill_size == 2048 and cpu.disable_cuda_graph and cpu.disable_overlap_schedule
    assert cpu.cpu_threads is not None and cpu.cpu_threads >= 1  # the cores split between two replicas
    assert cpu.grammar_backend is not None
    assert cpu.resolve() is cpu  # idempotent
    assert ServerArgs(enable_overlap_schedule_on_cpu=True).resolve("cpu").disable_overlap_schedule is False
    assert ServerArgs(chunked_prefill_size=-1).resolve("cpu").chunked_prefill_size == -1
    assert ServerArgs(log_level="WARNING").log_level == "warning"
    assert cpu.replace(port=1).resolved  # still resolved after a plain replace
    assert ServerArgs().inflight_limit(256) == 1024 and ServerArgs(max_inflight_requests=5).inflight_limit(256) == 5
    assert "api_key" in ServerArgs(api_key="secret").public_dict()
    assert ServerArgs(api_key="secret").public_dict()["api_key"] == "<set>"
    with pytest.raises(ValueError, match="resolved"):
        from radixlm.runtime.model_runner import ModelRunner

        ModelRunner(ServerArgs(), None)  # type: ignore[arg-type]
