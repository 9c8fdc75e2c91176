"""Speculative decoding seen from a client: meta_info counts, /server_info's
internal_states[0].avg_spec_accept_length (what SGLang's bench tooling reads) and Prometheus."""
from __future__ import annotations

import signal
import subprocess
import sys

from tests.server.conftest import start_server
from tests.speculative.test_spec_scheduler import COPY_TEXTS


def test_spec_counts_in_meta_info_server_info_and_metrics(tiny_model_dir, tmp_path) -> None:
    model = tiny_model_dir("llama")
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", str(model), "--port", "0",
           "--max-total-tokens", "4096", "--enable-metrics", "--cpu-threads", "1",
           "--speculative-algorithm", "NGRAM", "--speculative-num-steps", "5",
           # the counts, not the payoff: measured, it may keep a 32-token request on plain decoding
           "--speculative-adaptive", "off"]
    server = start_server(cmd, log, timeout=180)
    proc = server.proc
    try:

        async def go() -> None:
            st, out = await server.post("/generate", {"text": COPY_TEXTS[0], "sampling_params": {
                "max_new_tokens": 32, "temperature": 0, "ignore_eos": True}})
            assert st == 200, out
            meta = out["meta_info"]
            assert meta["completion_tokens"] == 32
            assert 0 < meta["spec_verify_ct"] < 32 and meta["spec_accepted_tokens"] > 0
            st, info = await server.get("/server_info")
            assert st == 200
            avg = info["internal_states"][0]["avg_spec_accept_length"]
            assert avg > 1.0 and info["speculative_algorithm"] == "NGRAM"
            st, text = await server.get("/metrics")
            assert st == 200
            values = {ln.split("{")[0]: float(ln.split()[-1]) for ln in text.splitlines()
                      if ln.startswith("sglang:spec_")}
            assert values["sglang:spec_accept_length"] == avg
            assert values["sglang:spec_verify_steps_total"] == meta["spec_verify_ct"]
            assert values["sglang:spec_accepted_tokens_total"] == meta["spec_accepted_tokens"]

        server.run(go())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
