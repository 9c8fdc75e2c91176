"""The published bit layouts of 4-bit checkpoints, both ways: unpack (load) and pack (test fixtures,
and the benchmark's random checkpoints). Every format stores W[n, k] = (c - z) * s per group with
unsigned 4-bit codes c and zero points z:

  * GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"): `qweight` int32 [K/8, N], code of column
    k in nibble k % 8 of word k // 8; `qzeros` int32 [G, N/8], z of output n in nibble n % 8 of
    word n // 8, stored as z - 1 (the v1 format's offset; "gptq_v2" stores z); `scales` fp16
    [G, N]; `g_idx` int32 [K] (each column's group; a permutation of k // group_size under desc_act).
  * AWQ (AutoAWQ GEMM): `qweight` int32 [K, N/8] and `qzeros` int32 [G, N/8] packed along the
    outputs, nibble i of word w holding output 8w + AWQ_ORDER[i]; `scales` fp16 [G, N].
  * compressed-tensors pack-quantized: `weight_packed` int32 [N, K/8] (column k in nibble k % 8 of
    word k // 8, the signed value + 8), `weight_scale` [N, G], `weight_zero_point` int32
    [ceil(N/8), G] packed along the outputs (asymmetric only), `weight_shape` [2],
    `weight_g_idx` [K] in older exports.

`quantize_rtn` is our own round-to-nearest quantizer (min/max per group, like AWQ's and GPTQ's
initial grid), used for test checkpoints and random benchmark models.
"""
from __future__ import annotations

import torch

from radixlm.runtime.quantization.w4a16 import W4Part

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output 8w + AWQ_ORDER[i]
_SHIFTS = tuple(range(0, 32, 4))


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> uint8 nibbles, nibble j of each word at position 8 * index + j along `dim`."""
    w = words.to(torch.int32).unsqueeze(dim + 1 if dim >= 0 else dim)
    shape = [1] * w.dim()
    shape[dim + 1 if dim >= 0 else dim] = 8
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device).view(shape)
    nibbles = (w >> shifts) & 0xF
    out_shape = list(words.shape)
    out_shape[dim] *= 8
    return nibbles.reshape(out_shape).to(torch.uint8)


def pack_int32(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `unpack_int32`: uint8 [.., 8 * W, ..] in 0..15 -> int32 [.., W, ..]."""
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=codes.device)
    words = (c << shifts).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def _awq_reorder(nibbles: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Outputs in AWQ's nibble order <-> natural order, along the last dimension."""
    order = torch.tensor(AWQ_ORDER, device=nibbles.device)
    if inverse:
        order = torch.argsort(order)
    n = nibbles.shape[-1]
    return nibbles.reshape(*nibbles.shape[:-1], n // 8, 8)[..., order].reshape(*nibbles.shape[:-1], n)


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                zero_offset: int = 1) -> W4Part:
    codes = unpack_int32(qweight, 0).t().contiguous()  # [N, K]
    zeros = (unpack_int32(qzeros, 1)[:, : codes.shape[0]].to(torch.int16) + zero_offset) & 0xF
    return W4Part(codes, scales, _asymmetric(zeros.to(torch.uint8)), g_idx)


def pack_gptq(part: W4Part, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    zeros = part.zeros if part.zeros is not None else torch.full(part.scales.shape, 8, dtype=torch.uint8)
    out = {
        "qweight": pack_int32(part.codes.t(), 0),
        "qzeros": pack_int32(((zeros.to(torch.int16) - zero_offset) & 0xF).to(torch.uint8), 1),
        "scales": part.scales,
    }
    if part.g_idx is not None:
        out["g_idx"] = part.g_idx.to(torch.int32)
    return out


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> W4Part:
    codes = _awq_reorder(unpack_int32(qweight, 1), inverse=True).t().contiguous()
    zeros = _awq_reorder(unpack_int32(qzeros, 1), inverse=True)[:, : codes.shape[0]]
    return W4Part(codes, scales, _asymmetric(zeros), None)


def pack_awq(part: W4Part) -> dict[str, torch.Tensor]:
    zeros = part.zeros if part.zeros is not None else torch.full(part.scales.shape, 8, dtype=torch.uint8)
    return {
        "qweight": pack_int32(_awq_reorder(part.codes.t(), inverse=False), 1),
        "qzeros": pack_int32(_awq_reorder(zeros, inverse=False), 1),
        "scales": part.scales,
    }


def unpack_pack_quantized(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                          shape: torch.Tensor | None, g_idx: torch.Tensor | None) -> W4Part:
    rows = int(packed.shape[0])
    k = int(shape.reshape(-1)[1]) if shape is not None else int(packed.shape[1]) * 8
    codes = unpack_int32(packed, 1)[:, :k].contiguous()
    zeros = None if zero_point is None else unpack_int32(zero_point, 0)[:rows].t().contiguous()
    return W4Part(codes, scale.t().contiguous(), zeros, g_idx)


def _asymmetric(zeros: torch.Tensor) -> torch.Tensor | None:
    """Zero points, or None when every one is 8 (a symmetric checkpoint): the kernels skip them."""
    return None if bool((zeros == 8).all()) else zeros.contiguous()


def quantize_rtn(weight: torch.Tensor, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype = torch.float16) -> W4Part:
    """[N, K] float -> codes, scales [G, N] and zeros (None if symmetric) by per-group min/max."""
    n, k = weight.shape
    gs = k if group_size <= 0 else group_size
    w = weight.float().reshape(n, k // gs, gs)
    if symmetric:
        scale = (w.abs().amax(-1) / 7.5).clamp_min(1e-8).to(scale_dtype)
        zero = torch.full_like(scale, 8.0, dtype=torch.float32)
    else:
        lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
        scale = ((hi - lo) / 15).clamp_min(1e-8).to(scale_dtype)
        zero = (-lo / scale.float()).round().clamp(0, 15)
    codes = (w / scale.float()[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    zeros = None if symmetric else zero.to(torch.uint8).t().contiguous()
    return W4Part(codes, scale.t().contiguous(), zeros, None)


def quantize_layers_w4(layers: torch.nn.Module, group_size: int, symmetric: bool, source: str) -> int:
    """`--load-format dummy` with a 4-bit checkpoint config: every linear layer of the decoder layers
    becomes a `W4Weight` of its random float weight (RTN, the config's group size and symmetry),
    one layer at a time so the float copies are freed as it goes. Returns the number of layers."""
    from radixlm.runtime.quantization.w4a16 import W4Weight

    count = 0
    for module in layers.modules():
        if hasattr(module, "quantized") and module.quantized is None and module.weight.dim() == 2 and module.weight.numel():
            k = module.weight.shape[1]
            size = group_size if group_size > 0 else k
            module.quantized = W4Weight([quantize_rtn(module.weight.data, size, symmetric)], size, f"{source} rtn")
            module.weight.data = module.weight.data.new_empty(0)
            count += 1
    return count
