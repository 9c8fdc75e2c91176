"""benchmarks/check_lora_swap.py at its tiny size on the CPU: many adapters on few device slots, the
same requests with every adapter resident, and each request alone, all float32 against a float64
transformers reference with each adapter merged (issue 21). The schedulers run in-process (no
subprocess start), with the overlap schedule on, as on a GPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from radixlm.benchmarks.check_lora_swap import SIZES, Request, Served, run_check
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs
from tests.runtime.helpers import greedy_req, run_to_completion


def _serve(sched, reqs: list[Request]) -> list[Served]:
    tokenized = [dataclasses.replace(greedy_req(f"r{i}", r.prompt, r.new_tokens), lora_path=r.adapter, return_logprob=True)
                 for i, r in enumerate(reqs)]
    out = run_to_completion(sched, tokenized)
    return [Served(out[t.rid]["output_ids"], [e[0] for e in out[t.rid]["output_token_logprobs"]]) for t in tokenized]


def scheduler_runs(model_dir: Path, paths: dict[str, Path], shape, reqs: list[Request], device: str) -> dict:
    """What `engine_runs` does, with in-process schedulers."""
    def scheduler(slots: int) -> Scheduler:
        args = ServerArgs(model_path=str(model_dir), device=device, dtype="float32", skip_tokenizer_init=True,
                          lora_paths=tuple(f"{n}={p}" for n, p in paths.items()), max_lora_rank=shape.max_rank,
                          max_loras_per_batch=slots, chunked_prefill_size=shape.chunked_prefill, max_total_tokens=16384,
                          cpu_threads=1, enable_overlap_schedule_on_cpu=True).resolve()
        return Scheduler(args, model_dir, None)

    swapped, resident = scheduler(shape.slots), scheduler(shape.adapters)
    runs = {"swapped": _serve(swapped, reqs), "swaps_batch": swapped.info()["lora"]["swaps"]}
    return {**runs, "alone": [_serve(swapped, [r])[0] for r in reqs], "resident": _serve(resident, reqs)}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return run_check(SIZES["tiny"], tmp_path_factory.mktemp("lora-swap"), "cpu", serve=scheduler_runs)


def test_every_request_is_served_with_its_own_adapter_swapped_resident_and_alone(report) -> None:
    for label, run in report["runs"].items():
        assert run["bad_requests"] == 0, (label, run["bad"])
        assert run["logprob_err_max"] < 1e-4, label  # float32 rounding, far below any adapter's effect
    for label, pair in report["pairs"].items():
        assert pair["outside_near_ties"] == 0, (label, pair["parted"])
    assert report["swaps_in_the_batch"] > 2 * SIZES["tiny"].slots
    assert report["pass"]


def test_the_audit_catches_a_request_served_with_another_adapter(report) -> None:
    flagged = report["adapters_change_outputs"]
    assert flagged["wrong_adapter_flagged"] == flagged["of"]
    assert flagged["wrong_adapter_logprob_err_median"] > 100 * 1e-3
