"""A live server for SGLang's own tests: default model, no API key (SGLang's kits send none)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.server.conftest import STARTUP_TIMEOUT_S, LiveServer, _alive, _children

# CI runs a fixed subset (tests/compat/catalog.py); `RADIXLM_COMPAT_ALL=1` (benchmarks/compat.py) runs all.
RUN_ALL = os.environ.get("RADIXLM_COMPAT_ALL") == "1"


@pytest.fixture(scope="session")
def compat_server(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("compat-server") / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--max-total-tokens", "16384", "--log-level", "warning", "--cpu-threads", "1"]
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
