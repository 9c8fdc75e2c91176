"""What of SGLang's own tests runs here, with what, and what is known to fail on content.

Shared by tests/compat (CI: the fixed subset) and benchmarks/compat.py (all of it, and the table in
benchmarks/RESULTS.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Functions of sglang/test/test_programs.py, in file order, with the arguments they are run with
# (check_answer=True where a function takes it: the strict form).
PROGRAMS: dict[str, dict[str, Any]] = {
    "test_few_shot_qa": {}, "test_mt_bench": {}, "test_select": {"check_answer": True}, "test_decode_int": {},
    "test_decode_json_regex": {}, "test_decode_json": {}, "test_expert_answer": {"check_answer": True},
    "test_tool_use": {}, "test_react": {}, "test_parallel_decoding": {},
    "test_parallel_encoding": {"check_answer": True}, "test_stream": {}, "test_regex": {}, "test_dtype_gen": {},
    "test_completion_speculative": {}, "test_chat_completion_speculative": {}, "test_gen_min_new_tokens": {},
}
# The two API-speculative programs need an OpenAI backend: they get one on our server's /v1.
OPENAI_PROGRAMS = {"test_completion_speculative": False, "test_chat_completion_speculative": True}  # is_chat_model

NOT_RUNNABLE = {
    "test_image_qa": "needs an image (example_image.png) and a vision model; the default model is text-only",
    "test_hellaswag_select": "downloads HellaSwag from GitHub (network)",
}
# Runnable through one frontend only.
FRONTEND_LIMITS = {
    ("sglang", "test_completion_speculative"): "SGLang's OpenAI backend loads tiktoken's cl100k_base encoding in its "
                                               "constructor (a network download; tiktoken is not installed)",
    ("sglang", "test_chat_completion_speculative"): "as test_completion_speculative",
}

# SGLang frontend settings (sglang.global_config) a program runs with, and why.
SGLANG_SETTINGS: dict[str, tuple[dict[str, Any], str]] = {
    "test_parallel_encoding": (
        {"enable_parallel_encoding": False},
        "SGLang's RuntimeEndpoint sends join(mode='concate_and_append') to POST /concate_and_append_request, a "
        "route SGLang 0.5.10's own server no longer has (absent from sglang/srt/entrypoints/http_server.py): with "
        "the default the program's stream executor dies on the 404 and the program hangs. With it off the "
        "frontend concatenates the branches' text (SGLang's 'srt-no-parallel' backend in its test_utils); "
        "radixlm's frontend always does that"),
}


@dataclass(frozen=True)
class KnownModelFailure:
    """An answer-content assertion the default model fails with both frontends. `evidence`: what
    transformers generates greedily on the same weights and prompt (benchmarks/compat.py --evidence)."""
    assertion: str
    evidence: str
    frontends: tuple[str, ...] = ("sglang", "radixlm")


KNOWN_MODEL_FAILURES: dict[str, KnownModelFailure] = {
    # transformers 5.x, float32, the converted default model folder, greedy (2026-12-02, /tmp script
    # equivalent to `benchmarks/compat.py --evidence`).
    "test_few_shot_qa": KnownModelFailure(
        "'washington' in the capital of the United States",
        "transformers' greedy answer to the same few-shot prompt is ' New York', as ours"),
    "test_select": KnownModelFailure(
        "'The capital of Germany is Berlin.' -> True",
        "transformers scores the options (mean token logprob) True -9.604, False -6.601, Unknown -14.844: "
        "it picks False, as ours"),
    # 2026-12-02 evening: `python benchmarks/compat.py --evidence` (transformers 5.x, float32, greedy, the
    # converted default model folder; benchmarks/results/compat_evidence.json).
    "test_decode_int": KnownModelFailure(
        "int(hours) == 24 (gen_int: REGEX_INT, [-+]?[0-9]+[ \\n]*)",
        "transformers' greedy decoding under the same regex (its logits, the regex package's partial matching) gives "
        "'240000000000…' as ours: after '24' no allowed token (digits, space, newline) beats '0'; unconstrained it "
        "says '24 hours'"),
    "test_expert_answer": KnownModelFailure(
        "'paris' in the text (check_answer=True)",
        "transformers' greedy gens on the same prompts: expert ' a Frenchman', answer '1000 is the capital of "
        "France', as ours (greedy and at the program's temperature 0.1)"),
    "test_react": KnownModelFailure(
        "'finland' or 'states' in the answer to 'What country does the creator of Linux live in?'",
        "transformers' greedy path through the same program: every thought, search and observation the same text "
        "as ours, the same Search, Search, Finish choices (option scores Search -0.61 / Finish -3.43, -0.10 / -4.91, "
        "-8.48 / -0.24), and the answer 'Creator of Linux'"),
    "test_parallel_encoding": KnownModelFailure(
        "'Noah' in the answer to 'Who is the father of Julian?'",
        "transformers' greedy continuation of the same prompt after 'ASSISTANT:' is empty (it ends at once), as ours"),
    "test_chat_completion_speculative": KnownModelFailure(
        "the assistant's reply fits 'Name: …\\nBirthday: …\\nJob: …' (radixlm fails the program after 3 replies that "
        "do not; SGLang's frontend would leave the variables empty)",
        "transformers' greedy reply to the same messages is 'Steve Jobs.\\nSteve Jobs.\\nSteve Jobs.', as ours: no "
        "'Birthday:' field", frontends=("radixlm",)),
}

# CI: programs that cover the issue-17 fixes (forks[i] +=, API speculation), cheap on a CPU and
# passing on content with the default model (benchmarks/RESULTS.md has all of them).
CI_PROGRAMS = ("test_tool_use", "test_parallel_decoding", "test_completion_speculative")


@dataclass(frozen=True)
class Kit:
    module: str
    mixin: str
    attrs: dict[str, Any] = field(default_factory=dict)  # class attributes the mixin expects
    note: str = ""
    # test method -> KnownModelFailure: its AssertionError is an xfail carrying the evidence
    known_model_failures: dict[str, KnownModelFailure] = field(default_factory=dict)


KITS: dict[str, Kit] = {
    "json_constrained": Kit("json_constrained_kit", "JSONConstrainedMixin"),
    "regex_constrained": Kit("regex_constrained_kit", "RegexConstrainedMixin"),
    "ebnf_constrained": Kit("ebnf_constrained_kit", "EBNFConstrainedMixin"),
    "matched_stop": Kit("matched_stop_kit", "MatchedStopMixin", known_model_failures={"test_finish_stop_str": KnownModelFailure(
        "the chat story (stop '\\n', max_tokens 1000) stops at a newline",
        "transformers' greedy 1,000 tokens of the same chat rendering hold no newline, as ours (finish 'length'); "
        "benchmarks/compat.py --stop-str-evidence")}),
    "abort_all": Kit("abort_timeout_kit", "AbortAllMixin", {"abort_all_max_new_tokens": 4000},
                     "shrunk: 16,000 new tokens assume a context over 8k; the default model's is 8,192"),
}
NOT_APPLICABLE_KITS = {
    "abort_timeout_kit.WaitingTimeoutMixin / RunningTimeoutTwoWaveMixin":
        "need SGLang's SGLANG_REQ_WAITING_TIMEOUT / running-timeout server settings, which radixlm does not have",
    "cache_hit_kit": "imports sglang.bench_serving and SGLang's benchmark datasets (SGLang's server dependencies)",
    "prefix_cache_branching_kit": "asserts a cache miss on a shared prefix: SGLang's chunk cache for hybrid "
                                  "(Mamba) models; a radix cache hits it by design",
    "radix_cache_server_kit": "a helper (run_radix_attention_test), no test class; run in benchmarks/compat.py",
    "eval_accuracy_kit / lm_eval_kit / kl_divergence_kit": "download GSM8K / MMLU / HumanEval / LongBench (network)",
    "mmmu_vlm_kit": "vision model", "spec_decoding_kit": "speculative decoding with a draft model",
}
CI_KITS = ("regex_constrained", "abort_all")  # ~30 s together on a loaded 2-core CPU; json/matched_stop take minutes
