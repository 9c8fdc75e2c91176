"""`radixlm bench`: real runs at toy sizes (the session server over HTTP; an Engine on a tiny model),
checking the summary table and the JSON record, and the one-line errors."""
from __future__ import annotations

import json

import pytest

from radixlm.runtime.bench.cli import bench_main
from tests.server.conftest import API_KEY


def test_bench_serving_against_a_running_server(server, tmp_path, capsys):
    out = tmp_path / "serving.json"
    code = bench_main(["serving", "--base-url", server.url, "--api-key", API_KEY, "--num-requests", "3",
                       "--input-len", "8", "--output-len", "4", "--output-file", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed
    assert "Mean TTFT (ms):" in printed and "P99 ITL (ms):" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "serving" and record["results"]["completed"] == 3
    assert record["results"]["total_output_tokens"] == 12 and record["results"]["ttft_ms"]["mean"] > 0
    assert record["config"]["api_key"] == "<set>"  # never written to a results file


def test_bench_offline_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "offline.json"
    code = bench_main(["offline", "--model-path", str(tiny_model_dir("llama")), "--device", "cpu",
                       "--cpu-threads", "1", "--max-total-tokens", "2048", "--num-prompts", "2", "--input-len", "8",
                       "--output-len", "3", "--output-file", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "Offline Throughput Benchmark Result" in printed and "Decode throughput (tok/s):" in printed
    results = json.loads(out.read_text())["results"]
    assert results["prefill_tok_s"] > 0 and results["decode_tok_s"] > 0 and results["device"] == "cpu"


@pytest.mark.parametrize("argv,message", [
    (["offline", "--dtype", "float33"], "--dtype"),
    (["serving", "--max-total-tokens", "0"], "--max-total-tokens"),
    (["nonsense"], "invalid choice"),
])
def test_bench_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench_main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and err.count("\n") == 1, err
