"""What batch-1 NGRAM does with random-weight greedy text, on the CPU (issue 18).

`speculative.py --mode gpu` times NGRAM on the 8B shape with random weights: greedy decoding of such a model falls
into repeats, which the drafter follows, and the steps before (no n-gram matches) decode plainly. The H200 run keeps
no outputs, so this script makes text of the same kind on the CPU and replays it through the drafter's settings
(spec_ceiling.gpu_batch1_arms: steps, plain steps, tokens per verify step, the speed-up and x / accept on the H200's
batch-1 step costs):

    python benchmarks/spec_random_text.py generate --layers 8 --seeds 0,1 --prompts 2 --out /tmp/random_text.json
    python benchmarks/spec_random_text.py replay /tmp/random_text.json [--k 4]

`generate`: the Llama-3.1-8B shape cut to --layers decoder layers (32 do not fit a small machine: 16 GB in bf16),
weights drawn as `--load-format dummy` draws them (weight_loader.init_dummy_weights: normal, std 1/sqrt(fan-in), norms
1; another generator than the GPU's, so other values, the same statistics), bf16, transformers' greedy generate, one
thread; prompts as speculative.py's gpu mode draws its "repeat" set (a random 64-token block repeated 8 times,
random.Random(1)). ~1-2 min a 128-token output at 8 layers.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from radixlm.benchmarks.spec_ceiling import GPU_BATCH1_ARMS, gpu_batch1_arms  # noqa: E402


def generate(layers: int, seeds: list[int], prompts: int, new_tokens: int, out: Path) -> None:
    import torch
    from gpu_suite import LLAMA_8B
    from transformers import LlamaConfig, LlamaForCausalLM

    from radixlm.runtime.weight_loader import init_dummy_weights

    torch.set_num_threads(1)
    vocab = LLAMA_8B["vocab_size"]
    cfg = LlamaConfig(**{k: v for k, v in LLAMA_8B.items() if k not in ("architectures", "torch_dtype")},
                      num_hidden_layers=layers)
    rows = json.loads(out.read_text()) if out.exists() else []
    for seed in seeds:
        torch.set_default_dtype(torch.bfloat16)  # (built in bf16: an fp32 copy first would need twice the memory)
        model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        init_dummy_weights(model, seed)
        model.eval()
        rng = random.Random(1)
        for p in range(prompts):
            prompt = [rng.randrange(1000, vocab - 1000) for _ in range(64)] * 8
            t = time.perf_counter()
            with torch.no_grad():
                ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            rows.append({"layers": layers, "seed": seed, "prompt_no": p, "prompt": prompt,
                         "output": ids[0, len(prompt):].tolist()})
            out.write_text(json.dumps(rows))
            print(f"layers {layers} seed {seed} prompt {p}: {new_tokens} tokens in {time.perf_counter() - t:.0f} s",
                  flush=True)
        del model


def replay(path: Path, k: int, layers: set[int] | None) -> dict:
    rows = [r for r in json.loads(path.read_text()) if r["output"] and (layers is None or r["layers"] in layers)]
    report = {"k": k, "outputs": [f"L{r['layers']}/s{r['seed']}/p{r['prompt_no']}" for r in rows],
              "arms": gpu_batch1_arms([(r["prompt"], r["output"]) for r in rows], k)}
    print(f"{len(rows)} outputs ({', '.join(report['outputs'])}), k = {k}, H200 batch-1 step costs")
    print("| arm | plain steps | verify steps | drafts | accepted | tok/verify step | speed-up | x/accept | "
          "x per tokens a step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, arm in report["arms"].items():
        m = arm["mean"]
        print(f"| {name} | {m['plain_steps']} | {m['verify_steps']} | {m['drafts']} | {m['accepted']} | {m['accept']} | "
              f"{m['speedup']} | {m['x_per_accept']} | {m['x_per_step_tokens']} |")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="random-weight greedy outputs of the 8B shape (fewer layers) on the CPU")
    g.add_argument("--layers", type=int, default=8)
    g.add_argument("--seeds", default="0", help="weight seeds, comma-separated")
    g.add_argument("--prompts", type=int, default=2, help="prompts per seed (the repeat set's first ones)")
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--out", required=True)
    r = sub.add_parser("replay", help=f"replay outputs through the drafter arms {list(GPU_BATCH1_ARMS)}")
    r.add_argument("path")
    r.add_argument("--k", type=int, default=4, help="the step's draft limit (the payoff's arm; 4 = num steps)")
    r.add_argument("--layers", default=None, help="only outputs of these layer counts, comma-separated")
    r.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cmd == "generate":
        generate(args.layers, [int(s) for s in args.seeds.split(",")], args.prompts, args.new_tokens, Path(args.out))
        return
    report = replay(Path(args.path), args.k, {int(x) for x in args.layers.split(",")} if args.layers else None)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
