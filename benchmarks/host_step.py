"""The host's share of a decode step (issues 14.4, 22.3): everything the scheduler does outside the
model, per step and per row, by part, at large batches.

A tiny random-weight Llama (hidden 64, 2 layers) with the default model's real tokenizer and vocab
runs on the CPU with the overlap schedule on (the GPU's path): its forward is cheap, and what is
left is the per-step and per-row work a GPU run pays on the host. Each part is timed exclusively
(a part's nested parts are not counted in it). Tensor math that runs on the device on a GPU (the
forward, the sampler's draw over [B, V], applying the bitmask) is timed apart as "device math" and
left out of the host total: there it is launched asynchronously. Medians over the steps whose batch
is full, in µs. "host after the tokens": the host's work in a step once it has read the previous step's
sampled tokens (on a GPU, after its wait for them: what delays the next forward's launch when the host is
late); "host from the tokens to the draw": of it, the part before the draw's launch (a constrained step:
grammar commit, masks, sampling values; `RADIXLM_SAMPLING_BEFORE_TOKENS=0` for the old order).

    python benchmarks/host_step.py --batch 64,256 --steps 40 [--modes plain,sampled,json]

  plain    greedy, unconstrained (workload (b)'s sampling)
  sampled  temperature 1 with seeds, unconstrained (item (f)'s unconstrained run)
  json     temperature 1 with seeds under item (f)'s JSON schema (masks, grammar commits)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from radixlm.runtime import result_processor, sampler  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.kv_pool import ReqToTokenPool  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.schedule_batch import ScheduledBatch  # noqa: E402
from radixlm.runtime.scheduler import Scheduler  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402
from radixlm.runtime.uncommitted_step import UncommittedStep  # noqa: E402

# item (f)'s schema (gpu_throughput.SCHEMA), with long strings so that rows stay in the batch
SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 400},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}
DEVICE = "device math"


class PartTimer:
    """Exclusive wall time per labelled call: a call's time minus the labelled calls inside it. `marks`:
    when (and after how much device math) a step first read the previous step's sampled tokens
    ("tokens": the wait on a GPU) and first launched its draw ("draw")."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open call: [children's inclusive time]
        self.enabled = False
        self.marks: dict[str, tuple[float, float]] = {}

    def mark(self, name: str) -> None:
        if self.enabled and name not in self.marks:
            self.marks[name] = (time.perf_counter(), self.spent.get(DEVICE, 0.0))

    def mark_before(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def marked(*args: Any, **kwargs: Any) -> Any:
            self.mark(label)
            return fn(*args, **kwargs)

        setattr(owner, name, marked)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spent, stack = self.spent, self._stack

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            stack.append([0.0])
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                children = stack.pop()[0]
                spent[label] += took - children
                if stack:
                    stack[-1][0] += took

        return timed

    def patch(self, owner: Any, name: str, label: str) -> None:
        setattr(owner, name, self.wrap(label, getattr(owner, name)))


def instrument(sched: Scheduler, timer: PartTimer) -> None:
    """Parts of the step, patched once: on the scheduler's own objects, and on the classes whose
    objects are made per step."""
    timer.patch(sched.runner, "forward", DEVICE)
    timer.patch(result_processor, "sample", DEVICE)  # the seeded draw over [B, V]
    timer.patch(result_processor, "apply_logit_adjustments", DEVICE)
    timer.patch(sched.results, "sample_rows", DEVICE)  # the logits' copy and the bitmask applied ([B, V])
    import radixlm.constrained as constrained

    timer.patch(constrained, "apply_token_bitmask_", DEVICE)
    timer.patch(sched, "_schedule_prefill", "schedule (prefill check)")
    timer.patch(sched, "_schedule_decode", "schedule decode batch")
    timer.patch(ScheduledBatch, "to_forward_batch", "to_forward_batch")
    timer.patch(ReqToTokenPool, "commit", "req_to_token commit")
    timer.patch(sched.results, "sample", "sample (host)")
    timer.patch(sampler.SamplingBatch, "build", "sampling params -> tensors")
    timer.patch(UncommittedStep, "start", "uncommitted step start (copy)")
    timer.patch(UncommittedStep, "take_tokens", "take tokens (wait + list)")
    timer.patch(sched.results, "commit", "results commit (append, stops)")
    timer.patch(sched, "_apply", "apply events")
    timer.patch(sched.decode_log, "on_step", "decode log")
    tokens = UncommittedStep._host_tokens

    def marked_tokens(step: UncommittedStep) -> list[int]:
        ids = tokens(step)
        timer.mark("tokens")  # (the wait for the device's tokens returned: the host's critical chain starts)
        return ids

    UncommittedStep._host_tokens = marked_tokens  # type: ignore[method-assign]
    timer.mark_before(result_processor, "sample", "draw")  # (outside its DEVICE wrapper: before the draw starts)


def instrument_grammars(sched: Scheduler, timer: PartTimer) -> None:
    if sched.grammars is not None and not getattr(sched.grammars, "_timed", False):
        sched.grammars._timed = True
        timer.patch(sched.grammars, "advance_many", "grammar commit (+ mask start)")
        timer.patch(sched.grammars, "bitmask", "masks taken (fill/wait + copy)")
        timer.patch(sched.grammars, "poll", "grammar poll")


def make_model_dir(root: Path, tokenizer_dir: Path | None, vocab: int) -> Path:
    d = root / f"tiny-llama-vocab{vocab}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if tokenizer_dir is not None and (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, d / name)
    return d


def default_tokenizer_dir() -> Path:
    root = Path.home() / ".cache" / "radixlm" / "converted"
    found = sorted(root.glob("*/tokenizer.json"))
    if found:
        return found[-1].parent
    return Path(".gpu_assets/smollm_tok")


def complete_tables(sched: Scheduler) -> None:
    """Every running row's state table filled whole, with its DFA moves (what a server that has served
    the schema a few seconds holds: the background completion, run here in-line as grammar_host does)."""
    from grammar_host import _complete

    done: set[int] = set()
    for req in sched.running:
        grammar = getattr(req.grammar, "grammar", None)
        if grammar is not None and id(grammar.table) not in done:
            done.add(id(grammar.table))
            _complete(grammar, with_moves=True)


def run_mode(sched: Scheduler, timer: PartTimer, mode: str, batch: int, steps: int, warm: int,
             json_temperature: float = 1.0, complete: bool = False, schema: dict | None = None) -> dict[str, Any]:
    """`batch` requests decode `steps` timed steps after `warm` untimed ones. JSON rows end when their
    grammar does (seeded: the same steps in every run of a commit with the same outputs): every step
    counts, and "rows" is the mean occupancy. `complete`: the schema's state table is completed
    before the timed steps (a served schema). `schema`: another JSON schema than SCHEMA."""
    rng = random.Random(batch)
    extra: dict[str, Any] = {"json_schema": json.dumps(schema or SCHEMA)} if mode == "json" else {}
    temperature = {"plain": 0.0, "sampled": 1.0, "json": json_temperature}[mode]
    tag = f"{mode}{batch}-{time.monotonic_ns()}"
    for i in range(batch):
        ids = [rng.randrange(100, 40000) % sched.runner.vocab_size for _ in range(64)]
        params = SamplingParams(temperature=temperature, seed=i, max_new_tokens=steps + warm + 16,
                                ignore_eos=not extra, **extra)
        sched.handle(TokenizedGenerateReq(rid=f"{tag}-{i}", input_ids=ids, params=params))
    deadline = time.monotonic() + 120
    while (sched.waiting or sched.partial or len(sched.running) < batch) and time.monotonic() < deadline:
        if not sched.step():
            time.sleep(0.001)  # grammar compiles
    for _ in range(warm):
        sched.step()
    if complete:
        complete_tables(sched)
    instrument_grammars(sched, timer)
    rows: dict[str, list[float]] = defaultdict(list)
    timer.enabled = True
    for _ in range(steps):
        if not sched.running:
            break
        timer.spent.clear()
        timer.marks.clear()
        occupancy = len(sched.running)
        start = time.perf_counter()
        sched.step()
        end = time.perf_counter()
        wall = end - start
        host = wall - timer.spent.get(DEVICE, 0.0)
        if "tokens" in timer.marks:  # host work once the previous tokens are known (device math left out)
            at, device_then = timer.marks["tokens"]
            rows["host after the tokens"].append((end - at - (timer.spent.get(DEVICE, 0.0) - device_then)) * 1e6)
            if "draw" in timer.marks and timer.marks["draw"][0] >= at:
                drawn, device_drawn = timer.marks["draw"]
                rows["host from the tokens to the draw"].append((drawn - at - (device_drawn - device_then)) * 1e6)
        rows["rows"].append(occupancy)
        rows["step wall"].append(wall * 1e6)
        rows["host total"].append(host * 1e6)
        named = sum(v for k, v in timer.spent.items() if k != DEVICE)
        rows["other (step body)"].append((host - named) * 1e6)
        for key, value in timer.spent.items():
            rows[key].append(value * 1e6)
        sched.pop_outputs()
    timer.enabled = False
    for req in list(sched.running) + list(sched.waiting) + list(sched.partial):
        sched.abort(req.rid, "benchmark done")
    while not sched.idle:
        sched.step()
    sched.pop_outputs()
    n = len(rows["rows"])
    if not n:
        return {"steps": 0}
    out = {k: statistics.median(v + [0.0] * (n - len(v))) for k, v in rows.items()}
    out["rows"] = statistics.mean(rows["rows"]) if n else 0.0
    out["host µs per row"] = statistics.median([h / r for h, r in zip(rows["host total"], rows["rows"])]) if n else 0.0
    out["steps"] = n
    return out


def make_scheduler(model_dir: Path, tokenizer: Any, batches: list[int], args: argparse.Namespace) -> Scheduler:
    opts = ServerArgs(model_path=str(model_dir), device="cpu", dtype="float32", load_format="dummy",
                      max_total_tokens=max(batches) * (64 + args.steps + args.warm + 40) + 4096,
                      max_running_requests=max(batches), enable_overlap_schedule_on_cpu=True,
                      grammar_mask_threads=args.mask_threads, chunked_prefill_size=16384,
                      skip_tokenizer_init=tokenizer is None)
    sched = Scheduler(opts.resolve(), model_dir, tokenizer)
    # Decide jump-forward and the overlap of constrained rows as on a GPU with decode graphs (at
    # batch 64+ no jump pays there, so constrained rows are overlapped), not as on a CPU.
    sched.results.decode_graphs = True
    return sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--modes", default="plain,sampled,json")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="run every (mode, batch) this many times, report the median")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--json-temperature", type=float, default=1.0,
                    help="0: greedy under the grammar (the CPU's draw over [B, 49152] at temperature 1 takes seconds)")
    ap.add_argument("--mask-threads", type=int, default=0, help="--grammar-mask-threads")
    ap.add_argument("--schema", choices=("long", "item-f"), default="long",
                    help="json: SCHEMA (long strings) or item (f)'s own (gpu_throughput.SCHEMA: a table of 7,397 states)")
    ap.add_argument("--one-model", action="store_true",
                    help="plain/sampled on the JSON run's scheduler (its 49,152-token vocabulary), not a small one")
    ap.add_argument("--complete-table", action="store_true",
                    help="json: complete the schema's state table before timing (a served schema)")
    ap.add_argument("--out", default="benchmarks/results/host_step.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else default_tokenizer_dir()
    root = Path(tempfile.mkdtemp(prefix="radixlm-host-step-"))
    batches = [int(b) for b in args.batch.split(",")]
    modes = args.modes.split(",")
    timer = PartTimer()
    scheds: dict[str, Scheduler] = {}
    if args.one_model or "json" in modes:  # the real tokenizer's vocab
        from transformers import AutoTokenizer

        d = make_model_dir(root, tok_dir, 49152)
        scheds["json"] = make_scheduler(d, AutoTokenizer.from_pretrained(str(d)), batches, args)
        instrument(scheds["json"], timer)
    if args.one_model:  # every mode on the JSON run's scheduler and model (the same vocabulary and caches)
        scheds["plain"] = scheds["sampled"] = scheds["json"]
    elif {"plain", "sampled"} & set(modes):  # a small vocab: the device math over [B, V] stays small on the CPU
        scheds["plain"] = scheds["sampled"] = make_scheduler(make_model_dir(root, None, 1024), None, batches, args)
        instrument(scheds["plain"], timer)
    schema = None
    if args.schema == "item-f":
        from gpu_throughput import SCHEMA as schema
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for mode in modes:
            for b in batches:
                results.setdefault(f"{mode} bs{b}", []).append(run_mode(scheds[mode], timer, mode, b, args.steps, args.warm,
                                                                               args.json_temperature,
                                                                               args.complete_table, schema))
    results = {name: {k: statistics.median([r.get(k, 0.0) for r in runs]) for k in {k for r in runs for k in r}}
               for name, runs in results.items()}
    fixed = ("host total", "host after the tokens", "host from the tokens to the draw", "host µs per row", "step wall",
             DEVICE, "rows", "steps")
    parts = sorted({k for r in results.values() for k in r} - set(fixed))
    load = os.getloadavg()
    print(f"\nhost µs per decode step, by part (median over {args.steps} steps, median of {args.repeat} runs; "
          f"load average {load[0]:.1f}); device math is not in the host total")
    print(f"{'part':<34}" + "".join(f"{k:>15}" for k in results))
    for part in (*fixed, *parts):
        print(f"{part:<34}" + "".join(f"{r.get(part, 0.0):>15.1f}" for r in results.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "load_average": load, "results": results,
                                          "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
