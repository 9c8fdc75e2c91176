"""All engine/server options in one frozen dataclass, passed explicitly; CLI flags use SGLang's names."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerArgs:
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    tokenizer_path: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"  # auto | dummy
    device: str | None = None  # None: cuda if available else cpu
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    # Memory
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = None
    context_length: int | None = None
    # Scheduling
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    schedule_conservativeness: float = 1.0
    # Constrained decoding
    grammar_backend: str | None = None
    grammar_compile_timeout: float = 10.0
    disable_jump_forward: bool = False
    grammar_mask_threads: int | None = None  # threads computing a batch's masks; None: cores - 1 (<= 16), 0: inline
    # GPU fast path
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # default: every decode batch the scheduler can form (<= 1024)
    enable_torch_compile: bool = False
    disable_overlap_schedule: bool = False
    enable_mixed_chunk: bool = False  # decode rows ride along with every prefill chunk, not only small ones
    enable_overlap_schedule_on_cpu: bool = False  # on by default only on CUDA, where it pays
    attention_backend: str | None = None  # torch | triton; None: triton on CUDA
    # Parallelism (runtime/parallel/): TP x PP ranks per replica, dp_size replicas behind one front
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    load_balance_method: str = "cache_aware"  # how the front picks a replica: cache_aware | round_robin | shortest_queue
    nnodes: int = 1  # the ranks of one replica spread over this many nodes
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of node 0's torch.distributed rendezvous
    # Misc
    random_seed: int = 0
    log_level: str = "info"
    enable_metrics: bool = False
    stream_interval: int = 1
    skip_tokenizer_init: bool = False
    max_request_body_bytes: int = 64 * 1024 * 1024
    cpu_threads: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule_policy not in ("lpm", "fcfs", "dfs-weight"):
            raise ValueError(f"schedule_policy: {self.schedule_policy!r} is not one of lpm, fcfs, dfs-weight")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError("mem_fraction_static: must be in (0, 1)")
        if self.grammar_mask_threads is not None and self.grammar_mask_threads < 0:
            raise ValueError("grammar_mask_threads: must be >= 0")
        for name in ("max_total_tokens", "max_running_requests", "context_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive")
        if self.enable_torch_compile:
            raise ValueError("enable_torch_compile: not supported; decode already runs as CUDA graphs of fused "
                             "Triton kernels (--disable-cuda-graph for eager)")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: {self.load_format!r} is not one of auto, dummy")
        self._check_parallel()

    def _check_parallel(self) -> None:
        for name in ("tp_size", "pp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.load_balance_method not in ("cache_aware", "round_robin", "shortest_queue"):
            raise ValueError(f"load_balance_method: {self.load_balance_method!r} is not one of "
                             "cache_aware, round_robin, shortest_queue")
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
        return dataclasses.replace(self, **changes)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            aliases = {"model_path": ["--model"], "tp_size": ["--tensor-parallel-size"], "dp_size": ["--data-parallel-size"],
                       "pp_size": ["--pipeline-parallel-size"]}
            names = [flag, *aliases.get(f.name, [])]
            if f.type in ("bool", bool):
                parser.add_argument(*names, dest=f.name, action="store_true", default=f.default)
                continue
            typ = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(*names, dest=f.name, type=typ, default=f.default)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
