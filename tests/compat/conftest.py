"""A live server for SGLang's own tests: default model, no API key (SGLang's kits send none).

`RADIXLM_COMPAT_URL=http://host:port` runs the tests against a server already started with the
default model instead (benchmarks/compat.py runs the full set in pieces that way)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.server.conftest import STARTUP_TIMEOUT_S, LiveServer, _alive, _children

# CI runs a fixed subset (tests/compat/catalog.py); `RADIXLM_COMPAT_ALL=1` (benchmarks/compat.py) runs all.
RUN_ALL = os.environ.get("RADIXLM_COMPAT_ALL") == "1"
EXTERNAL_URL = os.environ.get("RADIXLM_COMPAT_URL")


class _ExternalServer:
    """Stands in for the Popen handle of a server this session did not start: SGLang's abort kit
    asserts `process.poll() is None` (the server survived); here that means /health still answers."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def poll(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=30) as resp:
                return None if resp.status == 200 else resp.status
        except OSError:
            return 1


@pytest.fixture(scope="session")
def compat_server(tmp_path_factory: pytest.TempPathFactory):
    if EXTERNAL_URL:
        external = _ExternalServer(EXTERNAL_URL)
        yield LiveServer(url=external.url, proc=external, log=tmp_path_factory.mktemp("compat-server") / "none.log")
        return
    log = tmp_path_factory.mktemp("compat-server") / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--max-total-tokens", "16384", "--log-level", "warning", "--cpu-threads", "1",
           # SGLang's programs check the model's answers (test_tool_use: 257 * 983) and were selected on the
           # float32 model; the default 4-bit CPU path answers "15*257" there (bfloat16 activations).
           "--quantization", "none"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline, url = time.monotonic() + STARTUP_TIMEOUT_S, None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"ready at (http://\S+)", log.read_text())
        url = m.group(1) if m else time.sleep(0.5)
    if url is None:
        proc.kill()
        raise RuntimeError(f"the compat server did not start:\n{log.read_text()[-3000:]}")
    yield LiveServer(url=url, proc=proc, log=log)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        for pid in [proc.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
