"""The CLI without a running server: help, usage errors, and a clear failure on a bad model path."""
from __future__ import annotations

import subprocess
import sys


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_unknown_model_path_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    r = _run("-m", "radixlm.launch_server", "--model-path", str(missing), "--port", "0")
    assert r.returncode != 0
    assert "does not exist" in r.stderr and str(missing) in r.stderr
    assert "Traceback" not in r.stderr


def test_help_and_usage():
    r = _run("-m", "radixlm.launch_server", "--help")
    assert r.returncode == 0
    for flag in ("--model-path", "--port", "--api-key", "--tp-size", "--mem-fraction-static", "--max-running-requests",
                 "--max-total-tokens", "--chunked-prefill-size", "--context-length", "--dtype",
                 "--disable-radix-cache", "--schedule-policy", "--grammar-backend", "--served-model-name",
                 "--chat-template", "--log-level", "--enable-metrics", "--max-inflight-requests"):
        assert flag in r.stdout, flag
    r = _run("-c", "import sys; from radixlm.runtime.cli import main; sys.exit(main(['serve', '--help']))")
    assert r.returncode == 0 and "--model-path" in r.stdout
    r = _run("-c", "import sys; from radixlm.runtime.cli import main; sys.exit(main(['bogus']))")
    assert r.returncode == 2
    r = _run("-m", "radixlm.launch_server", "--schedule-policy", "nonsense")
    assert r.returncode == 2 and "schedule_policy" in r.stderr
    r = _run("-m", "radixlm.launch_server", "--chat-template", "/no/such/template.jinja")
    assert r.returncode != 0 and "chat-template" in r.stderr
