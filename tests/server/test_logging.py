"""What the server tells its operator: timestamped lines from every process, the start-up summary,
the tokenizer line, the periodic decode line, and --log-requests (numbers, never the text)."""
from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

from radixlm.runtime.decode_log import DecodeLog
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.request_log import RequestLog
from radixlm.runtime.sampling_params import SamplingParams

STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
SECRET = "zebra canary lighthouse"


def _wait_for(server, pattern: str, timeout: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, server.log.read_text(), re.M)
        if m or time.monotonic() > deadline:
            assert m, f"{pattern!r} not in the server log:\n{server.log.read_text()[-3000:]}"
            return m
        time.sleep(0.2)


def test_server_log_lines(server):
    rid = "log-test-rid-1"
    status, out = server.run(server.post("/generate", {
        "rid": rid, "text": SECRET, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}))
    assert status == 200, out
    # Every process logs timestamped, leveled lines naming itself.
    _wait_for(server, STAMP + r"server\] INFO ")
    _wait_for(server, STAMP + r"scheduler\] INFO ")
    # The start-up summary, with sizes in GB and the time it took.
    summary = _wait_for(server, STAMP + r"server\] INFO started .*weights \d+\.\d\d GB \(quantization gguf\), "
                                r"KV pool 16384 tokens \(\d+\.\d\d GB, float32\).*ready in \d+\.\d s$")
    assert "no CUDA graphs" in summary.group(0) or "CUDA graphs (batch" in summary.group(0)
    _wait_for(server, r"INFO loading the tokenizer from ")
    _wait_for(server, r"INFO tokenizer ready in ")
    # The periodic decode line (every 4 decode steps here).
    _wait_for(server, STAMP + r"scheduler\] INFO Decode batch\. #running-req: \d+, #queue-req: \d+, #token: \d+, "
                      r"token usage: \d\.\d\d, cache hit rate: \d+\.\d%, gen throughput \(token/s\): \d+\.\d\d$")
    # --log-requests: the finished request's numbers, and never its text (level 0).
    line = _wait_for(server, r"Finish request: (\{.*\"rid\": \"" + rid + r"\".*\})$")
    fields = json.loads(line.group(1))
    assert fields["completion_tokens"] == 16 and fields["prompt_tokens"] > 0
    assert fields["finish_reason"] == "length" and fields["latency_s"] > 0
    assert SECRET not in server.log.read_text()


def test_metrics_use_sglang_names(server):
    status, out = server.run(server.post("/generate", {
        "text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}))
    assert status == 200, out
    status, text = server.run(server.get("/metrics"))
    assert status == 200
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("sglang:") and " " in line}
    names = {key.split("{")[0] for key in values}
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:gen_throughput", "sglang:cache_hit_rate",
                 "sglang:token_usage", "sglang:num_used_tokens", "sglang:num_retracted_reqs",
                 "sglang:time_to_first_token_seconds_count", "sglang:time_per_output_token_seconds_count",
                 "sglang:inter_token_latency_seconds_count", "sglang:e2e_request_latency_seconds_count",
                 "sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:num_requests_total"):
        assert name in names, name
    tpot = [v for k, v in values.items() if k.startswith("sglang:time_per_output_token_seconds_count")]
    assert tpot and tpot[0] > 0


def test_request_log_levels(caplog):
    params = SamplingParams(max_new_tokens=4, temperature=0.5)
    state = SimpleNamespace(
        rid="r1", prompt_ids=[1, 2, 3], output_ids=[4, 5], created=time.monotonic() - 0.5,
        last=SimpleNamespace(finished_reason=FinishReason.stop(None), cached_tokens=2),
        item=SimpleNamespace(params=params, text="the prompt"), detok=SimpleNamespace(text="the output"))
    caplog.set_level("INFO", logger="radixlm.requests")
    for level in (0, 1, 2):
        RequestLog(level).finished(state)
    lines = [json.loads(r.getMessage().removeprefix("Finish request: ")) for r in caplog.records]
    assert lines[0] == {"rid": "r1", "prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 2,
                        "latency_s": lines[0]["latency_s"], "finish_reason": "stop"}
    assert "sampling_params" not in lines[0] and "prompt" not in lines[1]
    assert lines[1]["sampling_params"]["temperature"] == 0.5
    assert lines[2]["prompt"] == "the prompt" and lines[2]["output"] == "the output"


def test_decode_line_throughput_is_over_the_interval(caplog):
    caplog.set_level("INFO", logger="radixlm.scheduler")
    log = DecodeLog(interval=10)
    calls = []
    for _ in range(25):  # info() is read at the first decode step and then every 10th only
        log.on_step(ForwardMode.DECODE, lambda: calls.append(1) or {})
        log.on_step(ForwardMode.EXTEND, lambda: calls.append(1) or {})
    assert len(calls) == 3 and log.decode_steps == 25
    assert [r.getMessage().startswith("Decode batch. #running-req: 0") for r in caplog.records] == [True, True]
    log = DecodeLog(interval=10)
    info = {"generated_tokens": 100, "max_total_num_tokens": 1000, "kv_used_tokens": 300, "kv_evictable_tokens": 100,
            "num_running_reqs": 4, "num_waiting_reqs": 1, "cache_hit_rate": 0.25}
    first = log.line(info, now=10.0)
    assert "#running-req: 4, #queue-req: 1, #token: 200, token usage: 0.20, cache hit rate: 25.0%" in first
    assert first.endswith("gen throughput (token/s): 0.00")  # nothing to measure against yet
    assert log.line({**info, "generated_tokens": 300}, now=12.0).endswith("gen throughput (token/s): 100.00")
