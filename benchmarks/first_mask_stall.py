"""A new grammar's first mask on the scheduler's loop (issue 14 item 4): the longest step of a CPU server
decoding plain rows while a request of a schema never seen before (a 4,000-key object: front_stall_audit's
case) is compiled, admitted, and sampled under its first mask.

The first mask of a grammar builds llguidance's lexer and parser states (40-130 ms for this schema on the
2-core VM); a request's matcher is a deep copy of its family's template, which inherits what the template
computed. Where the template never computed a mask, every copy's first mask is that cost, on the loop
(`--grammar-mask-threads 0`, a CPU server) or waited for by it (mask threads). Each round uses a new schema
(keys renamed) so nothing is cached. A tiny random-weight model with the default model's tokenizer keeps the
forward cheap (host_step.py's).

    OMP_NUM_THREADS=1 python benchmarks/first_mask_stall.py --keys 4000 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_step import default_tokenizer_dir, make_model_dir  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.scheduler import Scheduler  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8, help="plain rows decoding beside")
    ap.add_argument("--out", default="benchmarks/results/first_mask_stall.json")
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    model = make_model_dir(Path(tempfile.mkdtemp(prefix="radixlm-first-mask-")), default_tokenizer_dir(), 49152)
    opts = ServerArgs(model_path=str(model), device="cpu", dtype="float32", load_format="dummy", max_total_tokens=65536,
                      enable_overlap_schedule_on_cpu=True, grammar_mask_threads=0, grammar_state_table="off")
    sched = Scheduler(opts.resolve(), model, AutoTokenizer.from_pretrained(str(model)))
    for i in range(args.rows):
        sched.handle(TokenizedGenerateReq(rid=f"plain{i}", input_ids=[100 + i, 7, 8, 9], params=SamplingParams(
            temperature=0.0, max_new_tokens=30000, ignore_eos=True)))
    warm = json.dumps({"type": "object", "properties": {"x": {"type": "integer"}}})
    sched.handle(TokenizedGenerateReq(rid="warm", input_ids=[5, 6], params=SamplingParams(max_new_tokens=2,
                                                                                           json_schema=warm)))
    rounds = []
    deadline = time.monotonic() + 120
    while sched.grammars is None or sched.grammars.pending or sched.waiting:  # the service's workers started
        sched.step()
        assert time.monotonic() < deadline
    for _ in range(20):
        sched.step()
    for r in range(args.rounds):
        schema = {"type": "object", "properties": {f"k{i}_{r}": {"type": "string", "maxLength": 8}
                                                   for i in range(args.keys)}}
        rid = f"json{r}"
        sched.handle(TokenizedGenerateReq(rid=rid, input_ids=[11, 12, 13], params=SamplingParams(
            temperature=0.0, max_new_tokens=2, json_schema=json.dumps(schema))))
        steps: list[float] = []
        first_token_step = None
        deadline = time.monotonic() + 300
        while first_token_step is None and time.monotonic() < deadline:
            start = time.perf_counter()
            sched.step()
            steps.append((time.perf_counter() - start) * 1e3)
            for out in sched.pop_outputs():
                if out.rid == rid and (out.output_ids or out.finished_reason is not None):
                    first_token_step = len(steps) - 1
        assert first_token_step is not None, "the JSON request produced nothing"
        for _ in range(3):  # its commit (overlap) and the steps after
            start = time.perf_counter()
            sched.step()
            steps.append((time.perf_counter() - start) * 1e3)
            sched.pop_outputs()
        rounds.append({"steps": len(steps), "longest_ms": max(steps), "median_ms": statistics.median(steps),
                       "first_token_step": first_token_step, "first_token_step_ms": steps[first_token_step],
                       "around_first_token_ms": steps[max(0, first_token_step - 2): first_token_step + 4]})
        print(f"round {r}: the step of its first token (its first mask) {steps[first_token_step]:.1f} ms; "
              f"{len(steps)} steps from the request to its first token + 3, longest {max(steps):.1f} ms, "
              f"median {statistics.median(steps):.2f} ms; around its first token "
              f"{[round(x, 1) for x in rounds[-1]['around_first_token_ms']]}", flush=True)
    sched.grammars.close()
    load = os.getloadavg()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": load, "config": vars(args), "rounds": rounds,
              "first_token_step_ms_median": statistics.median(r["first_token_step_ms"] for r in rounds)}
    print(f"the first token's step, median of rounds: {report['first_token_step_ms_median']:.1f} ms (load {load[0]:.1f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
