"""The CPU decode forward of a 4-bit Llama-family model as one C call per step (issue 20).

A batch-1 decode step of the default model on a CPU spends more time dispatching ~30 small ops a
layer (torch and ctypes calls of a few microseconds each) than multiplying. `CpuDecodeStack` hands
the whole stack of layers to `radixlm_decode_stack` (kernels/cpu_decode_stack.c), which runs the
same C kernels the per-op path calls (RMSNorm, add + RMSNorm, rotary, KV store, paged decode
attention, SiLU-and-mul, the int4 GEMV of each projection), op for op: its result is the per-op
path's. The embedding lookup, final norm and LM head stay in Python (three calls).

It applies (`CpuDecodeStack.build` returns None otherwise, and the model keeps its per-op path): a
float32 model on the CPU with the C kernels built, one rank, every projection an `Int4PackedWeight`
with the GEMV layout, no q/k norm, no qkv bias, no LoRA, a float32 KV pool, head dim a multiple of
16; per step (`applies`): a plain decode batch (no cascade) of at most GEMV_MAX_ROWS rows.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from radixlm.kernels.cpu_native import decode_kernels_library
from radixlm.kernels.cpu_ops import rope_rows
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool
from radixlm.runtime.quantization.int4_cpu import GEMV_MAX_ROWS, Int4PackedWeight

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class LayerArgs(ctypes.Structure):
    """kernels/cpu_decode_stack.c LayerArgs."""

    _fields_ = [("input_norm", _P), ("post_norm", _P), ("qkv", _P), ("o", _P), ("gate_up", _P), ("down", _P),
                ("qkv_planes", _I64), ("o_planes", _I64), ("gate_up_planes", _I64), ("down_planes", _I64),
                ("k_pool", _P), ("v_pool", _P)]


class StepArgs(ctypes.Structure):
    """kernels/cpu_decode_stack.c StepArgs."""

    _fields_ = [("rows", _I64), ("hidden", _I64), ("hq", _I64), ("hkv", _I64), ("dim", _I64), ("inter", _I64),
                ("eps", _F), ("sm_scale", _F), ("cos2", _P), ("sin2", _P), ("out_loc", _P), ("req_to_token", _P),
                ("r2t_stride", _I64), ("req_rows", _P), ("seq_lens", _P), ("num_threads", ctypes.c_int)]


@dataclass(frozen=True)
class StackShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    sm_scale: float


def _packed(module: torch.nn.Module) -> Int4PackedWeight | None:
    q = getattr(module, "quantized", None)
    if isinstance(q, Int4PackedWeight) and q.gemv_blocks is not None and getattr(module, "lora", None) is None:
        return q
    return None


class CpuDecodeStack:
    """The model's layers as C arguments, built once; `forward` runs a decode step's stack."""

    def __init__(self, model: torch.nn.Module, layers: ctypes.Array, shape: StackShape,
                 req_to_token: torch.Tensor) -> None:
        self.model = model
        self.layers = layers  # holds pointers into the model's tensors (the model keeps them alive)
        self.shape = shape
        self.req_to_token = req_to_token

    @classmethod
    def build(cls, model: torch.nn.Module, kv_pool: TokenToKVPool, req_to_token_pool: ReqToTokenPool,
              sm_scale: float) -> CpuDecodeStack | None:
        """The stack for `model`, or None where the C path does not apply (see the module docstring)."""
        if decode_kernels_library() is None or kv_pool.dtype != torch.float32:
            return None
        cfg, tp, stage = model.cfg, model.tp, model.stage
        if stage.size != 1 or tp.size != 1 or cfg.qk_norm or cfg.attention_bias or model.aux_layers:
            return None
        if cfg.head_dim % 16 or any(s != 1.0 for s in (*kv_pool.k_scales, *kv_pool.v_scales)):
            return None
        args = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            weights = [_packed(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(w is None for w in weights) or any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
                return None
            k_pool, v_pool = kv_pool.k_buffer[i], kv_pool.v_buffer[i]
            qkv, o, gate_up, down = weights
            args.append(LayerArgs(norms[0].data_ptr(), norms[1].data_ptr(), qkv.gemv_blocks.data_ptr(),
                                  o.gemv_blocks.data_ptr(), gate_up.gemv_blocks.data_ptr(), down.gemv_blocks.data_ptr(),
                                  qkv.planes, o.planes, gate_up.planes, down.planes, k_pool.data_ptr(),
                                  v_pool.data_ptr()))
        shape = StackShape(cfg.hidden_size, tp.heads, tp.kv_heads, cfg.head_dim, tp.intermediate, cfg.rms_norm_eps,
                           sm_scale)
        return cls(model, (LayerArgs * len(args))(*args), shape, req_to_token_pool.req_to_token)

    @staticmethod
    def applies(batch: ForwardBatch, hidden: torch.Tensor) -> bool:
        return (batch.mode is ForwardMode.DECODE and batch.cascade is None and hidden.dtype == torch.float32
                and 1 <= hidden.shape[0] <= GEMV_MAX_ROWS and hidden.shape[0] == len(batch.seq_lens_cpu))

    def forward(self, batch: ForwardBatch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, H] -> (hidden, residual) after the last layer (the model adds and norms them)."""
        s = self.shape
        lib = decode_kernels_library()
        assert lib is not None
        hidden = hidden.contiguous().clone()
        residual = torch.empty_like(hidden)
        rope = rope_rows(batch.positions, self.model.cos_sin_cache)
        out_loc = batch.out_cache_loc.to(torch.int64).contiguous()
        rows = batch.req_pool_indices.to(torch.int64).contiguous()
        lens = batch.seq_lens.to(torch.int64).contiguous()
        max_len = max(batch.seq_lens_cpu)
        if max_len > self.req_to_token.shape[1] or min(batch.seq_lens_cpu) < 1:
            raise ValueError(f"decode seq_lens {min(batch.seq_lens_cpu)}..{max_len} outside 1..{self.req_to_token.shape[1]}")
        step = StepArgs(hidden.shape[0], s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.eps,
                        s.sm_scale, rope.cos2.data_ptr(), rope.sin2.data_ptr(), out_loc.data_ptr(),
                        self.req_to_token.data_ptr(), self.req_to_token.stride(0), rows.data_ptr(), lens.data_ptr(),
                        torch.get_num_threads())
        status = lib.radixlm_decode_stack(self.layers, len(self.layers), ctypes.byref(step), hidden.data_ptr(),
                                          residual.data_ptr())
        if status != 0:
            raise MemoryError(f"CPU decode stack: the C kernels failed ({status})")
        return hidden, residual
