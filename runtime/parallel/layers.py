"""Tensor-parallel layers, the slicing of full checkpoint tensors per rank, and pipeline stages.

TP splits each decoder layer Megatron-style: qkv_proj and gate_up_proj are column-parallel (a rank
computes its own heads / MLP columns, no communication), o_proj and down_proj are row-parallel (each
rank's partial product, summed by one all-reduce). The embedding and the LM head are split by
vocabulary rows (the vocabulary padded to a multiple of tp_size); logits are all-gathered for the
sampler. KV heads are split like the query heads; with fewer KV heads than ranks, each rank keeps
a copy of the one KV head its query heads read. At tp_size 1 every layer here is a plain nn.Linear /
nn.Embedding and every slice is the whole tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from radixlm.runtime.model_config import ModelConfig
from radixlm.runtime.parallel.state import get_parallel_state, pp_rank_size, tp_rank_size
from radixlm.runtime.quantization.base import QuantizedWeight, linear_forward

if TYPE_CHECKING:
    from radixlm.runtime.dense_gemv import DenseGemv
    from radixlm.runtime.dense_row_blocks import RowBlocks
    from radixlm.runtime.dense_small_m import DenseSmallM
    from radixlm.runtime.lora.projection import LoRAProjection

# torch >= 2.13 renamed all_gather_into_tensor; the H200 machine has an older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_model_parallel(cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Refuse a TP / PP size this model's shape cannot be split by, with a clear message."""
    if cfg.num_heads % tp_size:
        raise ValueError(f"tp_size: {tp_size} does not divide this model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
        raise ValueError(f"tp_size: {tp_size} neither divides nor is a multiple of this model's "
                         f"{cfg.num_kv_heads} KV heads")
    if cfg.intermediate_size % tp_size:
        raise ValueError(f"tp_size: {tp_size} does not divide this model's MLP size {cfg.intermediate_size}")
    if pp_size > cfg.num_layers:
        raise ValueError(f"pp_size: {pp_size} is more stages than this model's {cfg.num_layers} layers")


@dataclass(frozen=True)
class TPLayout:
    """One rank's share of a model: its query heads, KV heads, MLP columns and vocabulary rows."""

    rank: int
    size: int
    head_dim: int
    heads: int
    kv_heads: int
    kv_head_start: int  # first (global) KV head held here
    intermediate: int
    vocab_shard: int  # embedding / LM head rows per rank
    vocab_size: int

    @classmethod
    def for_rank(cls, cfg: ModelConfig) -> "TPLayout":
        rank, size = tp_rank_size()
        check_model_parallel(cfg, size, 1)
        if cfg.num_kv_heads >= size:
            kv_heads = cfg.num_kv_heads // size
            kv_start = rank * kv_heads
        else:  # replicated: rank r's query heads all read KV head r * kv / tp
            kv_heads, kv_start = 1, rank * cfg.num_kv_heads // size
        return cls(rank=rank, size=size, head_dim=cfg.head_dim, heads=cfg.num_heads // size, kv_heads=kv_heads,
                   kv_head_start=kv_start, intermediate=cfg.intermediate_size // size,
                   vocab_shard=-(-cfg.vocab_size // size), vocab_size=cfg.vocab_size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    def shard(self, name: str, tensor: Any) -> torch.Tensor:
        """This rank's part of the full checkpoint tensor `name` (HF naming, without `model.`).
        `tensor` may be a lazy safetensors slice: only the part is read."""
        part = self._part(name, tensor) if self.size > 1 else tensor
        return part if isinstance(part, torch.Tensor) else part[:]

    def _part(self, name: str, tensor: Any) -> Any:
        module, kind = name.rsplit(".", 1)
        d = self.head_dim
        splits = {  # module suffix -> (dimension, start, length)
            "self_attn.q_proj": (0, self.rank * self.heads * d, self.heads * d),
            "self_attn.k_proj": (0, self.kv_head_start * d, self.kv_heads * d),
            "self_attn.v_proj": (0, self.kv_head_start * d, self.kv_heads * d),
            "mlp.gate_proj": (0, self.rank * self.intermediate, self.intermediate),
            "mlp.up_proj": (0, self.rank * self.intermediate, self.intermediate),
            "self_attn.o_proj": (1, self.rank * self.heads * d, self.heads * d),
            "mlp.down_proj": (1, self.rank * self.intermediate, self.intermediate),
        }
        for suffix, (dim, start, length) in splits.items():
            if module.endswith(suffix):
                if dim == 1 and kind != "weight":
                    raise ValueError(f"model_path: {name!r}: a bias on a row-parallel layer is not supported with TP")
                return tensor[start : start + length] if dim == 0 else tensor[:, start : start + length]
        if module in ("embed_tokens", "lm_head"):
            rows = tensor[min(self.vocab_start, self.vocab_size) : min(self.vocab_start + self.vocab_shard, self.vocab_size)]
            if rows.shape[0] < self.vocab_shard:  # the last rank's share of a padded vocabulary
                rows = torch.cat([rows, rows.new_zeros(self.vocab_shard - rows.shape[0], *rows.shape[1:])])
            return rows
        return tensor


def _tp_group() -> dist.ProcessGroup | None:
    state = get_parallel_state()
    return None if state is None else state.tp_group


def _row_kernel(layer: ColumnParallelLinear | RowParallelLinear,
                x: torch.Tensor) -> DenseGemv | DenseSmallM | RowBlocks | None:
    """The layer's measured kernel for x's rows: the M = 1 GEMV for one row, the small-M kernel for the row counts
    it was measured faster at (a verify step's 2..16), row blocks for a prefill chunk's rows
    (`runtime/dense_row_blocks.py`), or None (torch's product)."""
    if layer.gemv is not None and x.dim() == 2 and x.shape[0] == 1:
        return layer.gemv
    if layer.small_m is not None and layer.small_m.covers(x):
        return layer.small_m
    if layer.row_blocks is not None and layer.row_blocks.covers(x):
        return layer.row_blocks
    return None


def _product(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias): the layer's measured kernel for x's rows when it has one, else `linear_forward`."""
    kernel = _row_kernel(layer, x)
    if kernel is not None:
        return kernel(x, bias)
    return linear_forward(layer.weight, layer.quantized, x, bias)


class ColumnParallelLinear(nn.Linear):
    """Holds this rank's output features only (its heads, its MLP columns). No communication:
    the output stays split across ranks until a row-parallel layer sums it.
    `quantized`: the weight's packed form when the loader chose one (then `weight` is empty).
    `lora`: the batch's LoRA adapters' update, added to the output (--enable-lora).
    `gemv`: the bf16 M = 1 kernel measured faster than cuBLAS for this shape (`runtime/dense_gemv.py`), or None;
    `small_m`: the 2..16-row one (`runtime/dense_small_m.py`, a verify step's rows), or None;
    `row_blocks`: large products in blocks of rows (`runtime/dense_row_blocks.py`, a prefill chunk's rows), or None."""

    quantized: QuantizedWeight | None = None
    lora: LoRAProjection | None = None
    gemv: DenseGemv | None = None
    small_m: DenseSmallM | None = None
    row_blocks: RowBlocks | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = None if self.lora is None else self.lora.begin(x)  # may run beside the GEMM, or do it (stacked)
        out = pending.out if pending is not None and pending.out is not None else _product(self, x, self.bias)
        return out if self.lora is None else self.lora.finish(pending, out)

    def forward_then_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate | up] layer in one launch where its quantized weight has such a kernel
        (4-bit, one row: `QuantizedWeight.linear_silu_mul`), or with a LoRA update where its expand computes it
        (`LoRAProjection.forward_silu_mul`), else None; not with a bias."""
        if self.lora is not None and self.lora.active:
            return None if self.bias is not None else self.lora.forward_silu_mul(x, lambda: _product(self, x, None))
        if self.quantized is None or self.bias is not None:
            return None
        return self.quantized.linear_silu_mul(x)


    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(forward(rms_norm(x + residual)), x + residual) with the add and the norm inside the M = 1 GEMV's loads
        (--decode-gemv-norm), or None where that does not apply: no such GEMV here, more than one row, a LoRA update."""
        if (self.gemv is None or not self.gemv.fuse_norm or (self.lora is not None and self.lora.active)
                or x.dim() != 2 or x.shape[0] != 1):
            return None
        return self.gemv.add_norm(x, residual, norm_weight, eps)


class RowParallelLinear(nn.Linear):
    """Holds this rank's input features only; the partial products are summed over the TP group
    by one all-reduce. No bias (Llama-family o_proj / down_proj have none). Its kernels as the column-parallel
    layer's."""

    quantized: QuantizedWeight | None = None
    lora: LoRAProjection | None = None
    gemv: DenseGemv | None = None
    small_m: DenseSmallM | None = None
    row_blocks: RowBlocks | None = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.tp_group = _tp_group()

    def forward(self, x: torch.Tensor, lora_into: torch.Tensor | None = None) -> torch.Tensor:
        """`lora_into`: the residual this output is added to next (LoRA may add its update there,
        beside the GEMM: `LoRAProjection.begin`)."""
        pending = None if self.lora is None else self.lora.begin(x, lora_into)  # may run beside the GEMM, or do it
        out = pending.out if pending is not None and pending.out is not None else _product(self, x, None)
        if self.lora is not None:
            out = self.lora.finish(pending, out)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out

    def forward_silu_mul(self, gate_up: torch.Tensor, lora_into: torch.Tensor | None = None) -> torch.Tensor | None:
        """forward(silu(gate) * up) with the activation computed inside the M = 1 GEMV's loads (one launch less;
        the same bits as ops.silu_and_mul, then the GEMV), or None where that does not apply: no GEMV for this
        shape, more than one row, or a LoRA update on a path that reads the activation itself (the side-stream
        shrink of decode sizes reads [gate | up] too: `LoRAProjection.reads_silu_mul`). Not the small-M kernel's
        (2..16 rows): with the activation in its loads it measured slower than the activation kernel then itself
        (35.7 vs 30.7 + ~2.7 us on the 8B down projection, H200, RESULTS.md 2026-12-04)."""
        if self.gemv is None or gate_up.dim() != 2 or gate_up.shape[0] != 1:
            return None
        if self.lora is not None and not self.lora.reads_silu_mul(gate_up):
            return None
        pending = None if self.lora is None else self.lora.begin(gate_up, lora_into, silu_mul=True)  # or its GEMV
        out = pending.out if pending is not None and pending.out is not None else self.gemv(gate_up, None, silu_mul=True)
        if self.lora is not None:
            out = self.lora.finish(pending, out)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class VocabParallelEmbedding(nn.Embedding):
    """Holds vocabulary rows [vocab_start, vocab_start + vocab_shard); a token's vector comes from
    the rank holding it (the others contribute zeros to an all-reduce). `quantized`: the packed
    weight (rows dequantized per lookup), also the tied LM head's."""

    quantized: QuantizedWeight | None = None

    def __init__(self, layout: TPLayout, hidden_size: int) -> None:
        # An uninitialized weight (the loader fills it): nn.Embedding's own init, a normal_() on the meta
        # device the model is built on, imports torch._dynamo (2-20 s in every process that loads a model).
        super().__init__(layout.vocab_shard, hidden_size, _weight=torch.empty(layout.vocab_shard, hidden_size))
        self.vocab_start = layout.vocab_start
        self.tp_group = _tp_group()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:  # never under TP (the selector refuses it)
            return self.quantized.rows(ids).to(self.weight.dtype)
        if self.tp_group is None:
            return super().forward(ids)
        local = ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.masked_fill(~inside, 0), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        dist.all_reduce(out, group=self.tp_group)
        return out


def gather_vocab_logits(local: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, vocab_shard] logits of this rank's rows -> [N, vocab_size] on every rank."""
    group = _tp_group()
    if group is None:
        return local
    size = dist.get_world_size(group)
    rows, shard = local.shape
    parts = local.new_empty(size * rows, shard)
    _all_gather_single(parts, local.contiguous(), group=group)
    return parts.view(size, rows, shard).permute(1, 0, 2).reshape(rows, size * shard)[:, :vocab_size]


@dataclass(frozen=True)
class PipelineStage:
    """The decoder layers [start, end) one pipeline stage holds; the first embeds, the last
    normalizes and computes logits (and also holds the embedding when the LM head is tied to it)."""

    rank: int
    size: int
    start: int
    end: int
    tied_head: bool

    @classmethod
    def for_rank(cls, cfg: ModelConfig) -> "PipelineStage":
        rank, size = pp_rank_size()
        start, end = stage_layers(cfg.num_layers, rank, size)
        return cls(rank, size, start, end, cfg.tie_word_embeddings)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def has_embedding(self) -> bool:
        return self.first or (self.last and self.tied_head)

    def local_name(self, name: str) -> str | None:
        """The name checkpoint tensor `name` has in this stage's model; None if another stage holds it."""
        if name.startswith("layers."):
            index, rest = name.removeprefix("layers.").split(".", 1)
            if not self.start <= int(index) < self.end:
                return None
            return f"layers.{int(index) - self.start}.{rest}"
        if name.startswith("embed_tokens."):
            return name if self.has_embedding else None
        if name.startswith(("norm.", "lm_head.")):
            return name if self.last else None
        return name


def stage_layers(num_layers: int, stage: int, stages: int) -> tuple[int, int]:
    """Contiguous, near-equal layer ranges; the earlier stages take the remainder."""
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)
