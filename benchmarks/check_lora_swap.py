"""Is every LoRA request served with its own adapter, whatever the slots hold (issue 21)? A float32 check.

The H200 swap check in benchmarks/lora.py (bf16) found outputs of 64 adapters on 8 slots equal to
those of 64 resident slots on only 5/600 requests. In bf16, batches of other composition round
differently and near-ties part outputs, so that count says little. Here everything is float32
(TF32 off, exact Triton dots) and each request is judged against an exact reference instead of
against another run:

  swapped   many adapters on few device slots (`--max-loras-per-batch`), one batch of requests
            mixing adapters and the base model: slots are swapped (on CUDA on a side stream while
            the forward in flight runs), prompts are chunked, some prompts recur under other adapters
  resident  the same requests with a slot for every adapter (nothing swapped)
  alone     each request alone, on the swapped engine (so each one is a mixed batch's row, alone)

The reference is transformers' Llama in float64 with each adapter merged (W + B·A·alpha/r, PEFT's
math), teacher-forced along each run's own output. Per request and step it gives
  - the error of the log-prob the engine reported for its token (what its batch's logits said);
    a wrong or stale slot, a misrouted row or a swap racing with a forward is off by whole nats
  - the reference's margin of the chosen token below the best one: a greedy choice is right when
    that margin is below NEAR_TIE (check_fp32_exactness.py's near-tie rule)
and between runs, the first step where two runs' outputs part and the reference's gap between their
two tokens there (a near-tie when below NEAR_TIE). Any step outside these bounds fails the check.

    python benchmarks/check_lora_swap.py --size mid --out $OUT/lora_swap.json     (CUDA: ~2 min)
    python benchmarks/check_lora_swap.py --size tiny                              (CPU: seconds)
    python benchmarks/check_lora_swap.py --bisect --out $OUT/lora_bisect.json    (CUDA: ~3 min)
--bisect reruns a smaller check (size "bisect") once per engine variant (as served; CUDA graphs
off; cascade attention off; overlap schedule off) and prints one verdict line per variant, to tell
which mechanism a failure needs.
tests/runtime/test_lora_swap_check.py runs the tiny size in CI, and checks that the audit catches
requests served with another adapter than their own.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

NEAR_TIE = 1e-3  # top-2 log-prob gap below which a greedy divergence is a tie broken by rounding
LOGPROB_TOL = 1e-3  # |engine log-prob - float64 log-prob| of a chosen token: float32 rounding is ~1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    """The base model, the adapters and the workload."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_rank: int
    adapters: int
    slots: int  # --max-loras-per-batch of the swapped engine
    requests: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    chunked_prefill: int


SIZES = {
    "tiny": Shape(64, 128, 2, 4, 2, 512, 8, adapters=8, slots=2, requests=16, prompt_len=(4, 40),
                  new_tokens=(3, 10), chunked_prefill=32),
    "mid": Shape(1024, 2816, 6, 16, 4, 8192, 16, adapters=48, slots=6, requests=192, prompt_len=(16, 400),
                 new_tokens=(8, 64), chunked_prefill=512),
    "bisect": Shape(512, 1408, 4, 8, 2, 8192, 16, adapters=24, slots=4, requests=48, prompt_len=(16, 300),
                    new_tokens=(8, 56), chunked_prefill=256),
}
# --bisect: engine options of each variant (on top of `engine_runs`' common ones)
VARIANTS: dict[str, dict] = {
    "as_served": {}, "no_cuda_graph": {"disable_cuda_graph": True}, "no_cascade": {"cascade_attention": "off"},
    "no_overlap": {"disable_overlap_schedule": True},
    "stacked": {"lora_kernels": "stacked"},  # the shrink inside the base GEMM; a swap also restacks the A parts
}


# ------------------------------------------------------------------------------------ inputs
def build_model(root: Path, shape: Shape) -> Path:
    """A float32 Llama with random weights (LM head scaled up: sharper distributions, fewer ties)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(str(root / "base"))
    return root / "base"


def adapter_plan(i: int, max_rank: int) -> tuple[int, list[str]]:
    """Adapter i's rank and targets: ranks below the slot rank and partial targets leave parts of a
    slot zero, so a swap that left a previous adapter's weights behind would show."""
    rank = max_rank if i % 2 == 0 else max_rank // 2
    targets = [TARGETS, ["q_proj", "v_proj"], ["o_proj", "gate_proj", "up_proj", "down_proj"]][i % 3]
    return rank, targets


def write_adapter(folder: Path, shape: Shape, i: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT LoRA folder (PEFT's file format, float32, random A and B of about the base weights'
    effect) and its weights for the reference: (layer, module) -> (A, B, alpha / r)."""
    from safetensors.torch import save_file

    rank, targets = adapter_plan(i, shape.max_rank)
    alpha = 2.0 * rank
    head_dim = shape.hidden // shape.heads
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    feats = {"q_proj": (shape.hidden, q), "k_proj": (shape.hidden, kv), "v_proj": (shape.hidden, kv),
             "o_proj": (q, shape.hidden), "gate_proj": (shape.hidden, shape.intermediate),
             "up_proj": (shape.hidden, shape.intermediate), "down_proj": (shape.intermediate, shape.hidden)}
    g = torch.Generator().manual_seed(1000 + i)
    tensors, weights = {}, {}
    for layer in range(shape.layers):
        for module in targets:
            fin, fout = feats[module]
            a = torch.randn(rank, fin, generator=g) / fin**0.5
            b = torch.randn(fout, rank, generator=g) * 0.02
            part = "self_attn" if module in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            weights[(layer, module)] = (a, b, alpha / rank)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "rank_pattern": {}, "alpha_pattern": {}}))
    return weights


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    adapter: str | None
    new_tokens: int


def make_requests(shape: Shape, names: list[str], seed: int = 0) -> list[Request]:
    """Adapters drawn uniformly (one request in 8 on the base model); one prompt in 4 repeats an
    earlier one under another adapter (the prefix cache must keep them apart)."""
    rng = random.Random(seed)
    reqs: list[Request] = []
    for _ in range(shape.requests):
        adapter = None if rng.random() < 0.125 else rng.choice(names)
        if reqs and rng.random() < 0.25:
            prompt = rng.choice(reqs).prompt
        else:
            prompt = [rng.randrange(3, shape.vocab) for _ in range(rng.randint(*shape.prompt_len))]
        reqs.append(Request(prompt, adapter, rng.randint(*shape.new_tokens)))
    return reqs


# ------------------------------------------------------------------------------------ engine runs
@dataclass(frozen=True)
class Served:
    output: list[int]
    logprobs: list[float]  # the engine's log-prob of each output token


def generate(eng, reqs: list[Request]) -> list[Served]:
    params = [{"temperature": 0, "max_new_tokens": r.new_tokens, "ignore_eos": True} for r in reqs]
    res = eng.generate(input_ids=[r.prompt for r in reqs], sampling_params=params,
                       lora_path=[r.adapter for r in reqs], return_logprob=True, logprob_start_len=-1)
    return [Served(o["output_ids"], [e[0] for e in o["meta_info"]["output_token_logprobs"]]) for o in res]


def engine_runs(model_dir: Path, paths: dict[str, Path], shape: Shape, reqs: list[Request], device: str,
                options: dict | None = None) -> dict:
    """{"swapped", "resident", "alone"} -> per request what the engine served, plus swap counts
    (`options`: engine options over the common ones, a --bisect variant)."""
    import radixlm

    common: dict = dict(dtype="float32", skip_tokenizer_init=True, random_seed=0, device=device,
                        lora_paths=tuple(f"{n}={p}" for n, p in paths.items()), max_lora_rank=shape.max_rank,
                        chunked_prefill_size=shape.chunked_prefill, context_length=4096)
    if device == "cpu":
        common.update(max_total_tokens=16384, cpu_threads=1, enable_overlap_schedule_on_cpu=True)
    else:
        common.update(mem_fraction_static=0.3, cuda_graph_max_bs=64)
    common.update(options or {})
    runs: dict = {}
    with radixlm.Engine(str(model_dir), max_loras_per_batch=shape.slots, **common) as eng:
        runs["swapped"] = generate(eng, reqs)
        runs["swaps_batch"] = eng.get_server_info()["lora"]["swaps"]
        runs["alone"] = [generate(eng, [r])[0] for r in reqs]
    with radixlm.Engine(str(model_dir), max_loras_per_batch=shape.adapters, **common) as eng:
        runs["resident"] = generate(eng, reqs)
    return runs


# ------------------------------------------------------------------------------------ reference
class Reference:
    """transformers' Llama in float64 with one adapter merged at a time (PEFT's merged math)."""

    def __init__(self, model_dir: Path, adapters: dict[str, dict], device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64,
                                                          attn_implementation="eager").to(device).eval()
        self.base = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.adapters = adapters
        self.device = device
        self.merged: str | None = None

    def _merge(self, adapter: str | None) -> None:
        if adapter == self.merged:
            return
        self.model.load_state_dict(self.base)
        if adapter is not None:
            for (layer, module), (a, b, scaling) in self.adapters[adapter].items():
                part = "self_attn" if module in TARGETS[:4] else "mlp"
                w = getattr(getattr(self.model.model.layers[layer], part), module).weight
                w.data += scaling * (b.double().to(self.device) @ a.double().to(self.device))
        self.merged = adapter

    @torch.no_grad()
    def logprobs(self, adapter: str | None, prompt: list[int], output: list[int]) -> torch.Tensor:
        """[len(output), vocab] float64 log-probs of each output step, teacher-forced."""
        self._merge(adapter)
        ids = torch.tensor([prompt + output], device=self.device)
        logits = self.model(ids).logits[0, len(prompt) - 1: len(prompt) + len(output) - 1]
        return torch.log_softmax(logits.double(), -1).cpu()


def audit(reqs: list[Request], served: list[Served], ref: Reference) -> tuple[dict, list[torch.Tensor]]:
    """Each request's served tokens and log-probs against the float64 reference along that output."""
    worst_err, worst_margin, errs, bad = 0.0, 0.0, [], []
    ref_lps = []
    for i, (r, s) in enumerate(zip(reqs, served)):
        lp = ref.logprobs(r.adapter, r.prompt, s.output)
        ref_lps.append(lp)
        chosen = lp.gather(1, torch.tensor(s.output)[:, None])[:, 0]
        err = (chosen - torch.tensor(s.logprobs, dtype=torch.float64)).abs()
        margin = lp.max(-1).values - chosen
        errs.append(err.max().item())
        worst_err, worst_margin = max(worst_err, err.max().item()), max(worst_margin, margin.max().item())
        for step in torch.nonzero((err > LOGPROB_TOL) | (margin >= NEAR_TIE))[:, 0].tolist():
            bad.append({"request": i, "adapter": r.adapter, "step": step, "logprob_err": err[step].item(),
                        "margin_below_best": margin[step].item()})
            break  # the first bad step of each request
    return {"requests": len(reqs), "tokens": sum(len(s.output) for s in served),
            "logprob_err_max": worst_err, "logprob_err_median": statistics.median(errs),
            "greedy_margin_max": worst_margin, "bad_requests": len(bad), "bad": bad[:20]}, ref_lps


def compare(a: list[Served], b: list[Served], ref_a: list[torch.Tensor]) -> dict:
    """Where two runs' outputs part, and the reference's gap between their two tokens there."""
    parted = []
    for i, (x, y) in enumerate(zip(a, b)):
        k = next((j for j, (p, q) in enumerate(zip(x.output, y.output)) if p != q), None)
        if k is not None:
            gap = abs(ref_a[i][k, x.output[k]] - ref_a[i][k, y.output[k]]).item()
            parted.append({"request": i, "step": k, "gap": gap, "near_tie": gap < NEAR_TIE})
    return {"identical": f"{len(a) - len(parted)}/{len(a)}", "parted": parted,
            "outside_near_ties": sum(not p["near_tie"] for p in parted)}


# ------------------------------------------------------------------------------------ the check
def run_check(shape: Shape, root: Path, device: str, serve: Callable = engine_runs) -> dict:
    """Build, serve (`serve`: engine_runs, or the CI test's in-process schedulers), audit; the
    report's `pass` is the verdict."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    model_dir = build_model(root, shape)
    names = [f"lora{i}" for i in range(shape.adapters)]
    weights = {n: write_adapter(root / n, shape, i) for i, n in enumerate(names)}
    reqs = make_requests(shape, names)
    runs = serve(model_dir, {n: root / n for n in names}, shape, reqs, device)
    served_s = time.perf_counter() - started
    ref = Reference(model_dir, weights, device)
    report: dict = {"shape": asdict(shape), "device": device, "near_tie": NEAR_TIE, "logprob_tol": LOGPROB_TOL,
                    "distinct_adapters_used": len({r.adapter for r in reqs} - {None}),
                    "base_requests": sum(r.adapter is None for r in reqs), "runs": {}, "pairs": {}}
    ref_lps = {}
    for label in ("swapped", "resident", "alone"):
        report["runs"][label], ref_lps[label] = audit(reqs, runs[label], ref)
    for x, y in (("swapped", "resident"), ("swapped", "alone"), ("resident", "alone")):
        report["pairs"][f"{x}_vs_{y}"] = compare(runs[x], runs[y], ref_lps[x])
    report["swaps_in_the_batch"] = runs["swaps_batch"]
    report["adapters_change_outputs"] = adapters_matter(reqs, runs["swapped"], ref)
    report["pass"] = (all(r["bad_requests"] == 0 for r in report["runs"].values())
                      and all(p["outside_near_ties"] == 0 for p in report["pairs"].values())
                      and report["adapters_change_outputs"]["wrong_adapter_flagged"] > 0)
    report["serve_s"], report["wall_s"] = served_s, time.perf_counter() - started
    return report


def adapters_matter(reqs: list[Request], served: list[Served], ref: Reference) -> dict:
    """The check's power: the same outputs audited against a neighbouring adapter's reference must
    fail (a request served with another adapter is caught), else the adapters are too weak to tell."""
    names = sorted({r.adapter for r in reqs if r.adapter is not None})
    other = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}
    swapped = [Request(r.prompt, other.get(r.adapter) if r.adapter else names[0], r.new_tokens) for r in reqs]
    result, _ = audit(swapped, served, ref)
    return {"wrong_adapter_flagged": result["bad_requests"], "of": len(reqs),
            "wrong_adapter_logprob_err_median": result["logprob_err_median"]}


def print_summary(report: dict) -> None:
    print(f"{'run':10}{'requests':>9}{'tokens':>8}{'lp err max':>12}{'median':>10}{'margin max':>12}{'bad':>5}")
    for label, r in report["runs"].items():
        print(f"{label:10}{r['requests']:>9}{r['tokens']:>8}{r['logprob_err_max']:>12.2e}{r['logprob_err_median']:>10.2e}"
              f"{r['greedy_margin_max']:>12.2e}{r['bad_requests']:>5}")
        for b in r["bad"][:5]:
            print("   BAD", b)
    for label, p in report["pairs"].items():
        gaps = [f"{q['gap']:.1e}" for q in p["parted"]][:8]
        print(f"{label:22} identical {p['identical']:>9}, parted outside near-ties {p['outside_near_ties']}  gaps {gaps}")
    m = report["adapters_change_outputs"]
    print(f"audited against a neighbouring adapter instead: {m['wrong_adapter_flagged']}/{m['of']} requests flagged "
          f"(median lp err {m['wrong_adapter_logprob_err_median']:.2f})")
    print(f"adapters swapped into the {report['shape']['slots']} slots during the batch: {report['swaps_in_the_batch']}")
    print(f"VERDICT: {'PASS' if report['pass'] else 'FAIL'} (near-tie {NEAR_TIE:g}, log-prob tol {LOGPROB_TOL:g}); "
          f"served in {report['serve_s']:.0f} s, wall {report['wall_s']:.0f} s")


def bisect(shape: Shape, device: str, variants: list[str]) -> dict:
    """The check once per engine variant; `pass` when every variant passes."""
    report: dict = {"variants": {}}
    for name in variants:
        with tempfile.TemporaryDirectory() as tmp:
            serve = functools.partial(engine_runs, options=VARIANTS[name])
            r = run_check(shape, Path(tmp), device, serve=serve)
        report["variants"][name] = r
        runs = "  ".join(f"{k} {v['bad_requests']:>3}/{v['requests']} bad (median {v['logprob_err_median']:.1e})"
                         for k, v in r["runs"].items())
        first = sorted({b["step"] for v in r["runs"].values() for b in v["bad"]})[:6]
        print(f"{name:14} {'PASS' if r['pass'] else 'FAIL'}  {runs}  first bad steps {first}  "
              f"{r['wall_s']:.0f} s", flush=True)
    report["pass"] = all(r["pass"] for r in report["variants"].values())
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="mid" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bisect", action="store_true", help="size 'bisect' (unless --size) once per engine variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="--bisect: which variants, comma-separated")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.bisect:
        size = args.size if "--size" in sys.argv else "bisect"
        report = bisect(SIZES[size], args.device, args.variants.split(","))
        print(f"BISECT VERDICT: {'PASS' if report['pass'] else 'FAIL'}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
        raise SystemExit(0 if report["pass"] else 1)
    with tempfile.TemporaryDirectory() as tmp:
        report = run_check(SIZES[args.size], Path(tmp), args.device)
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    print_summary(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    raise SystemExit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
