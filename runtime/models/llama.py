"""Llama-family decoder, shared by Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (qkv bias) and Qwen3 (q/k norm).

Weights are fused at load time (qkv, gate_up) so each layer runs four matmuls. Under tensor
parallelism each rank builds its share (runtime/parallel/layers.py) and slices the full checkpoint
tensors as they load; under pipeline parallelism it builds only its stage's layers.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from radixlm.kernels import KernelOps, get_kernel_ops
from radixlm.runtime.attention import PagedAttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.model_config import ModelConfig, RopeScaling
from radixlm.runtime.models import split_norm_decode
from radixlm.runtime.parallel.layers import (
    ColumnParallelLinear,
    PipelineStage,
    RowParallelLinear,
    TPLayout,
    VocabParallelEmbedding,
    gather_vocab_logits,
)
from radixlm.runtime.quantization import fp8_act
from radixlm.runtime.quantization.base import linear_forward
from radixlm.runtime.quantization.fp8 import FP8
from radixlm.runtime.quantization.fp8_checkpoint import FP8_SCALE_KINDS, KV_SCALE_NAME, Fp8Checkpoint, fp8_scalar
from radixlm.runtime.quantization.select import GGUFTensor, build_quantized_weight
from radixlm.runtime.quantization.w4_checkpoint import W4Checkpoint, W4Scheme

if TYPE_CHECKING:
    from radixlm.runtime.cpu_decode_step import CpuDecodeStack


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type != "llama3":
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(cfg: ModelConfig, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] = [cos | sin] of each position's angles, in float32."""
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RMSNormWeight(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPLayout) -> None:
        super().__init__()
        self.layer_id = layer_id  # index into this rank's KV pool
        self.num_heads = tp.heads
        self.num_kv_heads = tp.kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = tp.heads * cfg.head_dim
        self.kv_size = tp.kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size)
        self.q_norm = RMSNormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNormWeight(cfg.head_dim) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps
        # The checkpoint's FP8 KV-cache scales (k_scale / v_scale), when it has them.
        self.kv_scales: dict[str, float] = {}

    def forward(
        self, hidden: torch.Tensor | None, batch: ForwardBatch, attn: PagedAttentionBackend,
        cos_sin: torch.Tensor, ops: KernelOps, residual: torch.Tensor | None = None, qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`residual`: what the output is added to next (a LoRA update may go there). `qkv`: the projection
        already made (the decoder's add + norm in the qkv GEMV's loads); then `hidden` is not read."""
        if qkv is None:
            qkv = self.qkv_proj(hidden)
        return self.o_proj(self.attend(qkv, batch, attn, cos_sin, ops), lora_into=residual)

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch, attn: PagedAttentionBackend, cos_sin: torch.Tensor,
               ops: KernelOps) -> torch.Tensor:
        """The attention's output [T, q_size] from the qkv projection (q / k norms, rotary, the KV store), before o."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = ops.rms_norm(q, self.q_norm.weight, self.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.eps)
        out = attn.decode_with_rotary(q, k, v, self.layer_id, batch, cos_sin)  # one launch where it applies
        if out is None:
            q, k_new, v_new = attn.rotary_and_store(q, k, v, self.layer_id, batch, cos_sin)
            out = attn.forward(q, k_new, v_new, self.layer_id, batch)
        return out.reshape(-1, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPLayout) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * tp.intermediate, bias=False)
        self.down_proj = RowParallelLinear(tp.intermediate, cfg.hidden_size)

    def forward(self, x: torch.Tensor | None, ops: KernelOps, residual: torch.Tensor | None = None,
                gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """`gate_up`: the projection already made (the add + norm in its GEMV's loads); then `x` is not read."""
        if gate_up is None:
            act = self.gate_up_proj.forward_then_silu_mul(x)  # batch 1, 4-bit weights: SiLU-and-mul in the GEMV's epilogue
            if act is not None:
                return self.down_proj(act, lora_into=residual)
            gate_up = self.gate_up_proj(x)
        fused = self.down_proj.forward_silu_mul(gate_up, lora_into=residual)  # batch 1 on a GPU: SiLU-and-mul in the GEMV's loads
        if fused is None:  # FP8 at W8A8 sizes: SiLU-and-mul emits down's e4m3 input
            fused = fp8_act.silu_mul_linear(self.down_proj, gate_up, ops)
        return fused if fused is not None else self.down_proj(ops.silu_and_mul(gate_up), lora_into=residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPLayout) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNormWeight(cfg.hidden_size)
        self.post_attention_layernorm = RMSNormWeight(cfg.hidden_size)
        self.eps = cfg.rms_norm_eps


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = TPLayout.for_rank(cfg)  # this rank's heads, MLP columns and vocabulary rows (all at TP=1)
        self.stage = PipelineStage.for_rank(cfg)  # this rank's layers (all at PP=1)
        stage = self.stage
        self.embed_tokens = VocabParallelEmbedding(self.tp, cfg.hidden_size) if stage.has_embedding else None
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i, self.tp) for i in range(stage.end - stage.start)])
        self.norm = RMSNormWeight(cfg.hidden_size) if stage.last else None
        self.lm_head = (ColumnParallelLinear(cfg.hidden_size, self.tp.vocab_shard, bias=False)
                        if stage.last and not cfg.tie_word_embeddings else None)
        # Filled by the runner (rope_cos_sin_cache on its device): the model is built on the meta device,
        # where computing it here imported torch._dynamo (2-20 s in every process that loads a model).
        self.register_buffer("cos_sin_cache", torch.empty(max_positions, cfg.head_dim), persistent=False)
        self.ops: KernelOps = get_kernel_ops(False)  # the runner swaps in Triton kernels on a GPU
        # EAGLE-3 drafting: the layers whose input hidden states (residual stream) each forward keeps,
        # concatenated in `aux_hidden` [T, len x hidden] for every token; none otherwise (no cost).
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None
        # The CPU decode step as one C call (runtime/cpu_decode_step.py), set by the runner where it applies.
        self.decode_stack: CpuDecodeStack | None = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: PagedAttentionBackend,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states (after the final norm) of the rows in `batch.logits_indices`.

        Pipeline parallelism: a stage after the first starts from the previous stage's
        `intermediate` (hidden, residual), and a stage before the last returns its own instead."""
        ops = self.ops
        residual: torch.Tensor | None = None
        if intermediate is None:
            hidden = self.embed_tokens(batch.input_ids)
        else:
            hidden, residual = intermediate
        stack = self.decode_stack
        if stack is not None and intermediate is None and stack.applies(batch, hidden):
            hidden, residual = stack.forward(batch, hidden)
            return self._final_norm(batch, hidden, residual)
        cos_sin = self.cos_sin_cache if ops.rotary_table is None else ops.rotary_table(batch.positions, self.cos_sin_cache)
        if intermediate is None and split_norm_decode.applies(self, batch, hidden):  # batch-1 4-bit: no norm launches
            hidden, residual = split_norm_decode.forward_layers(self, batch, attn, cos_sin, hidden)
            return self._final_norm(batch, hidden, residual)
        aux: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:  # (a copy: a LoRA update may be added into the residual in place)
                aux[i] = hidden.clone() if residual is None else hidden + residual
            # batch 1 with --decode-gemv-norm: each add + RMSNorm inside the next GEMV's loads (one launch less)
            fused = layer.self_attn.qkv_proj.forward_add_norm(hidden, residual, layer.input_layernorm.weight, layer.eps)
            if fused is None:  # FP8 at W8A8 sizes: the (add +) norm emits qkv's e4m3 input
                fused = fp8_act.add_norm_linear(layer.self_attn.qkv_proj, hidden, residual, layer.input_layernorm.weight,
                                                layer.eps, ops)
            if fused is not None:
                qkv, new_residual = fused
                residual = hidden if residual is None else new_residual
                hidden = layer.self_attn(None, batch, attn, cos_sin, ops, residual, qkv=qkv)
            else:
                if residual is None:
                    residual = hidden
                    normed = ops.rms_norm(hidden, layer.input_layernorm.weight, layer.eps)
                else:
                    normed, residual = ops.fused_add_rms_norm(hidden, residual, layer.input_layernorm.weight, layer.eps)
                hidden = layer.self_attn(normed, batch, attn, cos_sin, ops, residual)
            post = layer.post_attention_layernorm.weight
            fused = layer.mlp.gate_up_proj.forward_add_norm(hidden, residual, post, layer.eps)
            if fused is None:  # and gate_up's
                fused = fp8_act.add_norm_linear(layer.mlp.gate_up_proj, hidden, residual, post, layer.eps, ops)
            if fused is not None:
                gate_up, residual = fused
                hidden = layer.mlp(None, ops, residual, gate_up=gate_up)
            else:
                normed, residual = ops.fused_add_rms_norm(hidden, residual, post, layer.eps)
                hidden = layer.mlp(normed, ops, residual)
        assert residual is not None
        if self.aux_layers:
            self.aux_hidden = torch.cat([aux[i] for i in self.aux_layers], dim=-1)
        if not self.stage.last:
            return hidden, residual  # type: ignore[return-value]
        return self._final_norm(batch, hidden, residual)

    def _final_norm(self, batch: ForwardBatch, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if batch.mode is ForwardMode.DECODE and self.ops.name.startswith("triton"):
            # every row in order (logits_indices = arange): the add, the row pick and the norm in one launch,
            # the same bits (the fused kernel rounds the sum to bf16 first, as `hidden + residual` does)
            return self.ops.fused_add_rms_norm(hidden, residual, self.norm.weight, self.cfg.rms_norm_eps)[0]
        hidden = hidden + residual
        hidden = hidden[batch.logits_indices]
        return self.ops.rms_norm(hidden, self.norm.weight, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:  # its forward: the small-row kernels measured for its shape (a verify step's rows)
            return gather_vocab_logits(self.lm_head(hidden), self.cfg.vocab_size).float()
        head = self.embed_tokens
        return gather_vocab_logits(linear_forward(head.weight, head.quantized, hidden), self.cfg.vocab_size).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | GGUFTensor]], w4: W4Scheme | None = None) -> None:
        """Copy HF-named tensors into the fused layout; refuse unknown or missing tensors.

        A `GGUFTensor` (raw GGUF blocks) is collected with the other parts of its fused weight;
        once all are read the layer gets a packed `QuantizedWeight` (its float weight is dropped)
        or, where no kernel takes those types, the parts are dequantized into the weight. FP8 codes
        and scales, and a 4-bit checkpoint's (`w4`: its scheme) packed tensors, are collected the same way."""
        params = dict(self.named_parameters())
        blocks: dict[str, list[tuple[int, GGUFTensor]]] = {}
        fp8 = Fp8Checkpoint()
        packed = W4Checkpoint(w4) if w4 is not None else None
        loaded: set[str] = set()
        cfg = self.cfg
        q, kv = self.tp.heads * cfg.head_dim, self.tp.kv_heads * cfg.head_dim
        inter = self.tp.intermediate
        fused = {  # HF suffix -> (our suffix, row offset, rows)
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
            "self_attn.k_proj": ("self_attn.qkv_proj", q, kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, inter),
            "mlp.up_proj": ("mlp.gate_up_proj", inter, inter),
        }
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            hf_name = name.removeprefix("model.")
            name = self.stage.local_name(hf_name)  # None: a weight of another pipeline stage
            if name is None or (name == "lm_head.weight" and self.lm_head is None):
                continue
            kv_scale = KV_SCALE_NAME.match(name)
            if kv_scale:  # the checkpoint's FP8 KV-cache scale of one layer
                layer, key = int(kv_scale.group(1)), kv_scale.group(2) or kv_scale.group(3)
                self.layers[layer].self_attn.kv_scales[key] = float(fp8_scalar(tensor))
                continue
            if not isinstance(tensor, GGUFTensor):
                tensor = self.tp.shard(hf_name, tensor)  # this rank's rows / columns of it
            target, rows = name, None
            for hf, (ours, offset, count) in fused.items():
                if f".{hf}." in f".{name}":
                    target = name.replace(hf, ours)
                    rows = (offset, count)
                    break
            module_name, kind = target.rsplit(".", 1)
            if packed is not None and kind in packed.kinds:  # a 4-bit layer's codes, scales, zeros, g_idx
                packed.add(module_name, 0 if rows is None else rows[0], kind, tensor)
                if packed.is_codes(kind):
                    loaded.add(f"{module_name}.weight:{rows}")
                continue
            if kind in FP8_SCALE_KINDS:  # an FP8 layer's weight_scale / input_scale
                fp8.add(module_name, 0 if rows is None else rows[0], kind, tensor)
                continue
            if target not in params:
                raise ValueError(f"model_path: unexpected weight {name!r} in checkpoint")
            param = params[target]
            dst = param.data if rows is None else param.data.narrow(0, rows[0], rows[1])
            if dst.shape != tensor.shape:
                raise ValueError(f"model_path: weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            if isinstance(tensor, GGUFTensor):
                blocks.setdefault(target, []).append((0 if rows is None else rows[0], tensor))
            elif tensor.dtype == FP8:
                fp8.add(module_name, 0 if rows is None else rows[0], kind, tensor)
            else:
                dst.copy_(tensor)
            loaded.add(f"{target}:{rows}")
        for target, parts in blocks.items():
            self._load_blocks(target, params[target], sorted(parts, key=lambda p: p[0]))
        for module_name in packed.modules() if packed is not None else ():
            module = self.get_submodule(module_name)
            if not hasattr(module, "quantized"):
                raise ValueError(f"model_path: {module_name!r} is 4-bit in the checkpoint but has no quantized form here")
            out_features, in_features = module.weight.shape
            module.quantized = packed.build(module_name, out_features, in_features, module.weight.device)
            module.weight.data = module.weight.data.new_empty(0)
        for module_name in fp8.modules():
            module = self.get_submodule(module_name)
            module.quantized = fp8.build(module_name, module.weight.shape[0], module.weight.device)
            module.weight.data = module.weight.data.new_empty(0)  # the float copy is never read
        expected = 0
        for pname, p in params.items():
            if "qkv_proj.weight" in pname or "qkv_proj.bias" in pname:
                expected += 3
            elif "gate_up_proj" in pname:
                expected += 2
            else:
                expected += 1
        if len(loaded) != expected:
            got = {s.split(":")[0] for s in loaded}
            missing = sorted(n for n in params if n not in got)[:5]
            raise ValueError(f"model_path: checkpoint is missing weights, e.g. {missing}")

    def _load_blocks(self, target: str, param: nn.Parameter, parts: list[tuple[int, GGUFTensor]]) -> None:
        """Packed weight for a layer that takes one, else the parts dequantized into their rows."""
        module = self.get_submodule(target.rsplit(".", 1)[0])
        complete = sum(p.shape[0] for _, p in parts) == param.shape[0]
        quantized = (build_quantized_weight([p for _, p in parts], param.device)
                     if complete and hasattr(module, "quantized") else None)
        if quantized is not None:
            module.quantized = quantized
            param.data = param.data.new_empty(0)  # the float copy is never read again
            return
        for offset, part in parts:
            param.data.narrow(0, offset, part.shape[0]).copy_(part.dequantize())


MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}
