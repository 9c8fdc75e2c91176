"""Batch-1 decode of a 4-bit Llama with each residual add + RMSNorm split across the linears around it.

`kernels/split_norm.py`: the producer linear (o before the post-attention norm, down before the next layer's
input norm) finishes its tiles with the new residual, u = h * g and the tiles' sums of h^2; the consumer (gate_up,
the next qkv) reads u and scales its products by rstd. So a decode layer launches no norm kernel: qkv,
attention (+ merge), o, gate_up, SiLU-and-mul, down. The first layer's input norm and the final norm stay
launches of their own (the embedding and the LM head are not 4-bit linears).

It applies to one decode row whose layers' four linears are all `W4Weight`s served by an M = 1 kernel
(`W4Weight.split_norm_serves`, which also holds the switch --decode-split-norm), without LoRA updates, tensor
or pipeline parallelism, or EAGLE's auxiliary hidden states. A linear that cannot take its part at run time
(its kernel does not compile) falls back to its plain launch and the norm kernel, step by step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from radixlm.kernels.split_norm import PendingNorm
    from radixlm.runtime.attention import PagedAttentionBackend
    from radixlm.runtime.models.llama import LlamaForCausalLM

_PARTS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def applies(model: LlamaForCausalLM, batch: ForwardBatch, hidden: torch.Tensor) -> bool:
    """Whether this forward takes the split norm (see the module docstring)."""
    from radixlm.runtime.quantization import w4a16

    if (batch.mode is not ForwardMode.DECODE or hidden.dim() != 2 or hidden.shape[0] != 1
            or model.aux_layers or not (model.stage.has_embedding and model.stage.last) or not model.layers):
        return False
    for layer in model.layers:
        for block, name in _PARTS:
            linear = getattr(getattr(layer, block), name)
            quantized = linear.quantized
            if (not isinstance(quantized, w4a16.W4Weight) or not quantized.split_norm_serves() or linear.bias is not None
                    or getattr(linear, "tp_group", None) is not None or (linear.lora is not None and linear.lora.active)):
                return False
    return True


def _normed(pending: PendingNorm) -> torch.Tensor:
    """The consumer's input as the norm kernel would give it (a consumer that could not take u itself)."""
    rstd = torch.rsqrt(pending.sumsq.sum() / pending.u.shape[-1] + pending.eps)
    return (pending.u.float() * rstd).to(pending.u.dtype)


def _consume(linear: torch.nn.Module, pending: PendingNorm) -> torch.Tensor:
    out = linear.quantized.linear_split_norm(None, pending=pending)
    return out if out is not None else linear(_normed(pending))


def forward_layers(model: LlamaForCausalLM, batch: ForwardBatch, attn: PagedAttentionBackend, cos_sin: torch.Tensor,
                   hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of a decode row from the embedding's `hidden`: (the last layer's output, its residual), as the
    decoder's own loop returns them for the final norm."""
    from radixlm.kernels.split_norm import AddNorm
    from radixlm.runtime.models import w4_l2_prefetch

    w4_l2_prefetch.ensure(model)  # each linear's L2 hints of the next one's bytes (off unless planned)
    ops = model.ops
    layers = model.layers
    eps = model.cfg.rms_norm_eps
    residual = hidden
    normed: torch.Tensor | None = ops.rms_norm(hidden, layers[0].input_layernorm.weight, eps)
    pending: PendingNorm | None = None
    for i, layer in enumerate(layers):
        sa, mlp = layer.self_attn, layer.mlp
        qkv = sa.qkv_proj(normed) if pending is None else _consume(sa.qkv_proj, pending)
        out = sa.attend(qkv, batch, attn, cos_sin, ops)
        post = layer.post_attention_layernorm.weight
        made = sa.o_proj.quantized.linear_split_norm(out, add_norm=AddNorm(residual, post, eps))
        if made is None:
            normed, residual = ops.fused_add_rms_norm(sa.o_proj(out), residual, post, eps)
            gate_up = mlp.gate_up_proj(normed)
            act = ops.silu_and_mul(gate_up)
        else:
            pending, residual = made
            weight = mlp.gate_up_proj.quantized
            # --decode-silu-epilogue: SiLU-and-mul in the consumer's last split too
            act = weight.linear_split_norm(None, pending=pending, silu_mul=True) if weight.silu_epilogue else None
            if act is None:
                act = ops.silu_and_mul(_consume(mlp.gate_up_proj, pending))
        if i == len(layers) - 1:
            return mlp.down_proj(act), residual
        nxt = layers[i + 1].input_layernorm.weight
        made = mlp.down_proj.quantized.linear_split_norm(act, add_norm=AddNorm(residual, nxt, eps))
        if made is None:
            normed, residual = ops.fused_add_rms_norm(mlp.down_proj(act), residual, nxt, eps)
            pending = None
        else:
            pending, residual = made
    raise AssertionError("unreachable: the loop returns at the last layer")
