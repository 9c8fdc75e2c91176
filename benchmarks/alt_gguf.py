"""Issue 16.7 (3): transformers' GGUF loader vs our converter (runtime/gguf_convert.py) on the default
model's GGUF (SmolLM2-135M-Instruct Q4_1).

  * output: every tensor of transformers' `from_pretrained(gguf_file=...)` state dict against our
    converted folder's (max |diff|), and the greedy continuation + logits of a few prompts through
    transformers' model class on each;
  * time (each in a fresh process, best of `--repeat`): our conversion (once per file, cached),
    loading our converted folder (every start), and transformers' GGUF load (every start: it keeps
    no converted copy).

    python benchmarks/alt_gguf.py [--gguf FILE] [--repeat 3] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROMPTS = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nName three colors.<|im_end|>\n"]

# Each timing runs in a fresh interpreter: imports and page cache are what a server start sees.
_TIMED = {
    "our_convert": "from radixlm.runtime.gguf_convert import convert_gguf; convert_gguf(Path(GGUF), Path(TMP) / 'out', progress=False)",
    "our_load": "import torch; from transformers import AutoModelForCausalLM; "
                "AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32)",
    "transformers_gguf_load": "import torch; from transformers import AutoModelForCausalLM; "
                              "AutoModelForCausalLM.from_pretrained(str(Path(GGUF).parent), gguf_file=Path(GGUF).name, "
                              "dtype=torch.float32)",
}


def timed_in_fresh_process(what: str, gguf: Path, folder: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        code = (f"import time; from pathlib import Path; GGUF, FOLDER, TMP = {str(gguf)!r}, {str(folder)!r}, {tmp!r}\n"
                f"t0 = time.perf_counter()\n{_TIMED[what]}\nprint(time.perf_counter() - t0)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])


def compare_outputs(gguf: Path, folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if k in b and a[k].shape == b[k].shape}
    shape_mismatch = sorted(k for k in a if k in b and a[k].shape != b[k].shape)
    tok = AutoTokenizer.from_pretrained(str(folder))
    their_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompts = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            la, lb = ours(ids).logits, theirs(ids).logits
            ga = ours.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
            gb = theirs.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        prompts.append({"prompt": prompt, "max_logit_diff": float((la - lb).abs().max()), "same_greedy": ga == gb,
                        "same_prompt_ids": ids[0].tolist() == their_tok(prompt).input_ids})
    return {"tensors_compared": len(diffs), "tensors_equal": sum(d == 0.0 for d in diffs.values()),
            "max_abs_diff": max(diffs.values()), "only_ours": sorted(set(a) - set(b)), "only_theirs": sorted(set(b) - set(a)),
            "shape_mismatch": shape_mismatch, "prompts": prompts}


def main() -> None:
    from radixlm.runtime.model_source import default_gguf_path, resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gguf = args.gguf or default_gguf_path()
    folder = resolve_model_path(str(gguf))
    result: dict[str, Any] = {"gguf": gguf.name, "output": compare_outputs(gguf, folder), "seconds_best_of": {}}
    print(json.dumps(result["output"], indent=1), flush=True)
    for what in _TIMED:
        result["seconds_best_of"][what] = round(min(timed_in_fresh_process(what, gguf, folder) for _ in range(args.repeat)), 2)
        print(what, result["seconds_best_of"][what], "s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
