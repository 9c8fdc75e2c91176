"""SGLang parity: all of tests/compat (SGLang's test programs through both frontends, and its HTTP kits)
against a live server with the default model, as a table (test x frontend x pass/fail/cause); and
the evidence behind known model failures (transformers' greedy output on the same weights and prompt).

    python benchmarks/compat.py                       # runs pytest tests/compat with RADIXLM_COMPAT_ALL=1
    radixlm serve --port 30000 --max-total-tokens 16384 &   # or, in pieces against one server:
    python benchmarks/compat.py --url http://127.0.0.1:30000 -k "test_react or test_stream"
    python benchmarks/compat.py --table               # the table from the rows gathered so far
    python benchmarks/compat.py --evidence --url http://127.0.0.1:30000 --programs test_few_shot_qa

Rows of a piece replace the same (test, frontend) rows already in --out, so pieces add up.

CI runs only the subset in tests/compat/catalog.py (CI_PROGRAMS, CI_KITS).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.compat: the catalog and runner the test suite uses


def run_suite(out_json: Path, url: str | None, select: str | None) -> list[dict]:
    xml_path = out_json.with_suffix(".xml")
    env = {**os.environ, "RADIXLM_COMPAT_ALL": "1"}
    if url:
        env["RADIXLM_COMPAT_URL"] = url
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/compat",
                    f"--junitxml={xml_path}", *(["-k", select] if select else [])], cwd=ROOT, env=env, check=False)
    new = [_row(case) for case in ET.parse(xml_path).getroot().iter("testcase")]
    xml_path.unlink()
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
             "commit": _commit(), "piece_seconds": round(time.monotonic() - started)}
    old = json.loads(out_json.read_text()).get("rows", []) if out_json.exists() else []
    keys = {(r["test"], r["frontend"]) for r in new}
    rows = [r for r in old if (r["test"], r["frontend"]) not in keys] + [{**r, **stamp} for r in new]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"rows": rows}, indent=1))
    return rows


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _row(case: ET.Element) -> dict:
    name = case.get("name", "")
    m = re.fullmatch(r"test_program\[(\w+)-(\w+)\]", name)
    test, frontend = (m.group(1), m.group(2)) if m else (f"{case.get('classname', '').split('.')[-1]}.{name}", "http")
    outcome, cause = "pass", ""
    for tag, label in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "skip")):
        el = case.find(tag)
        if el is not None:
            msg = el.get("message", "") or (el.text or "")
            outcome = "known model failure" if tag == "skipped" and "xfail" in (el.get("type", "") + msg) else label
            cause = " ".join(msg.split())[:300]
    return {"test": test, "frontend": frontend, "outcome": outcome, "cause": cause,
            "seconds": round(float(case.get("time", 0)), 1)}


def print_table(rows: list[dict]) -> None:
    print("| test | frontend | result | cause |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['test']} | {r['frontend']} | {r['outcome']} ({r['seconds']} s) | {r['cause'].replace('|', '/')} |")


# ------------------------------------------------------------------------------ evidence
def evidence(url: str, programs: list[str], max_tokens: int) -> list[dict]:
    """Each unconstrained gen of the programs (radixlm's frontend, recorded through a proxy): the
    server's greedy answer and transformers' greedy answer on the same weights and prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.compat.recording_proxy import RecordingProxy
    from tests.compat.runner import ProgramStepFailed, model_path, run_program

    path = model_path(url)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    proxy = RecordingProxy(url).start()
    out = []
    for name in programs:
        try:
            run_program("radixlm", name, proxy.url)
            result = "pass"
        except (AssertionError, ProgramStepFailed) as exc:
            result = f"{type(exc).__name__}: {' '.join(str(exc).split())[-300:]}"
        for _, route, body in proxy.take():
            if route == "/v1/chat/completions":
                out.append({"program": name, "program_result": result, **_chat_greedy(url, tok, model, body, max_tokens)})
                continue
            sp = (body or {}).get("sampling_params") or {}
            if route == "/generate" and isinstance(body.get("text"), list) and body.get("return_logprob"):
                out.append({"program": name, "program_result": result, **_select_scores(tok, model, body["text"])})
                continue
            if route != "/generate" or sp.get("max_new_tokens") == 0 or sp.get("json_schema") or sp.get("ebnf") \
                    or not isinstance(body.get("text"), str) or body.get("return_logprob"):
                continue
            n = min(sp.get("max_new_tokens", 128), max_tokens)
            stops = [sp["stop"]] if isinstance(sp.get("stop"), str) else list(sp.get("stop") or [])
            greedy = {"text": body["text"], "sampling_params": {**sp, "temperature": 0, "max_new_tokens": n}}
            req = urllib.request.Request(url + "/generate", json.dumps(greedy).encode(), {"Content-Type": "application/json"})
            ours = json.loads(urllib.request.urlopen(req, timeout=600).read())["text"]
            ids = tok(body["text"], return_tensors="pt").input_ids
            if sp.get("regex"):
                theirs = _regex_greedy(tok, model, ids, sp["regex"], n)
            else:
                with torch.no_grad():
                    gen = model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:]
                theirs = tok.decode(gen, skip_special_tokens=True)
            for s in stops:
                theirs = theirs.split(s)[0] if s in theirs else theirs
            out.append({"program": name, "program_result": result, "prompt_tail": body["text"][-80:],
                        **({"regex": sp["regex"]} if sp.get("regex") else {}),
                        "radixlm_greedy": ours, "transformers_greedy": theirs, "same": ours == theirs})
    proxy.stop()
    return out


def stop_str_evidence(url: str, max_tokens: int = 1000) -> list[dict]:
    """The matched_stop kit's test_finish_stop_str: its story prompt, greedy, `stop: "\\n"`, through
    /v1/chat/completions (the part that fails; its /v1/completions part passes), and transformers'
    greedy continuation of the chat template's rendering: does a newline come within `max_tokens`?"""
    import torch
    from sglang.test.kits.matched_stop_kit import MANY_NEW_TOKENS_PROMPT
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.compat.runner import model_path

    path = model_path(url)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "You are a helpful AI assistant"},
                {"role": "user", "content": MANY_NEW_TOKENS_PROMPT}]
    cases = {"/v1/chat/completions": ({"messages": messages}, tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))}
    out = []
    for route, (body, ids) in cases.items():
        req = {**body, "model": "default", "temperature": 0, "top_p": 1, "max_tokens": max_tokens, "stop": "\n"}
        http = urllib.request.Request(url + route, json.dumps(req).encode(), {"Content-Type": "application/json"})
        choice = json.loads(urllib.request.urlopen(http, timeout=1800).read())["choices"][0]
        with torch.no_grad():
            gen = model.generate(torch.tensor([list(ids)]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):].tolist()
        text = tok.decode(gen, skip_special_tokens=False)
        out.append({"route": route, "radixlm_finish_reason": choice["finish_reason"],
                    "radixlm_matched_stop": choice.get("matched_stop"),
                    "transformers_tokens": len(gen), "transformers_has_newline": "\n" in text,
                    "transformers_tail": text[-120:]})
    return out


def _chat_greedy(url: str, tok, model, body: dict, max_tokens: int) -> dict:
    """A chat request (API speculation sends whole assistant turns) greedy on our server and greedy
    through transformers on the chat template's rendering of the same messages."""
    import torch

    n = min(body.get("max_tokens") or 128, max_tokens)
    req = {**body, "temperature": 0, "max_tokens": n}
    http = urllib.request.Request(url + "/v1/chat/completions", json.dumps(req).encode(), {"Content-Type": "application/json"})
    ours = json.loads(urllib.request.urlopen(http, timeout=600).read())["choices"][0]["message"]["content"]
    ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        gen = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    theirs = tok.decode(gen, skip_special_tokens=True)
    return {"prompt_tail": body["messages"][-1]["content"][-80:], "radixlm_greedy": ours, "transformers_greedy": theirs,
            "same": ours == theirs}


def _regex_greedy(tok, model, ids, pattern: str, max_tokens: int) -> str:
    """Greedy decoding under a regex with transformers' logits and no grammar engine of ours: each step
    takes the most likely token whose text keeps the output a prefix of some match (the `regex`
    package's partial matching); end of sequence only once the output is a full match."""
    import regex
    import torch

    compiled = regex.compile(pattern)
    configured = getattr(model.generation_config, "eos_token_id", None)
    eos = {tok.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    out_ids: list[int] = []
    text = ""
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.cat([ids, torch.tensor([out_ids], dtype=ids.dtype)], 1) if out_ids else ids).logits[0, -1]
        for candidate in torch.argsort(logits, descending=True)[:5000].tolist():
            if candidate in eos:
                if compiled.fullmatch(text):
                    return text
                continue
            extended = tok.decode(out_ids + [candidate], skip_special_tokens=True)
            if extended != text and compiled.fullmatch(extended, partial=True):
                out_ids.append(candidate)
                text = extended
                break
        else:
            return text + " [no token in the top 5000 continues the regex]"
    return text


def _select_scores(tok, model, texts: list[str]) -> dict:
    """A select's options (the texts share the program's prefix) scored by transformers as radixlm's
    token_length_normalized does: the mean logprob of each option's tokens after the prefix."""
    import os.path

    import torch

    prefix = os.path.commonprefix(texts)
    all_ids = [tok(text).input_ids for text in texts]
    # The options' tokens: after the ids all texts share (an option's first token may absorb the
    # prefix's trailing space, so tokenizing the prefix alone would over-count it).
    n_prefix = len(os.path.commonprefix(all_ids))
    scores = {}
    for text, ids_list in zip(texts, all_ids):
        ids = torch.tensor([ids_list])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        picked = logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]][max(n_prefix - 1, 0):]
        scores[text[len(prefix):]] = round(float(picked.mean()), 4)
    return {"prompt_tail": prefix[-80:], "transformers_option_scores": scores,
            "transformers_choice": max(scores, key=scores.get)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", action="store_true")
    ap.add_argument("--stop-str-evidence", action="store_true", help="evidence for the matched_stop kit's test_finish_stop_str")
    ap.add_argument("--url", default=None, help="a running server (default for --evidence: http://127.0.0.1:30000; "
                                                "for the suite: start one)")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression: run this piece only")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    ap.add_argument("--programs", nargs="*", default=None)
    ap.add_argument("--max-tokens", type=int, default=48, help="evidence: tokens per gen compared")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compat.json")
    args = ap.parse_args()
    if args.stop_str_evidence:
        rows = stop_str_evidence(args.url or "http://127.0.0.1:30000")
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        args.out.with_name("compat_evidence_stop_str.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    if args.evidence:
        from tests.compat.catalog import KNOWN_MODEL_FAILURES

        rows = evidence(args.url or "http://127.0.0.1:30000", args.programs or list(KNOWN_MODEL_FAILURES), args.max_tokens)
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        args.out.with_name("compat_evidence.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    if args.table:
        print_table(json.loads(args.out.read_text())["rows"])
        return
    print_table(run_suite(args.out, args.url, args.select))


if __name__ == "__main__":
    main()
