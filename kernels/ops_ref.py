"""Pure-torch elementwise ops of the decoder: the CPU path and the reference for the Triton ones."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate halves) rotary embedding.

    q [T, Hq, D], k [T, Hkv, D], positions [T], cos_sin_cache [max_pos, D] = [cos(D/2) | sin(D/2)].
    """
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def quantize_kv_ref(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x in the pool's dtype: an FP8 pool stores x * (1 / scale) rounded to nearest, saturated to
    the format's range (a plain cast would make NaN / inf of an outlier); a float pool just casts."""
    if dtype.itemsize > 1:
        return x.to(dtype)
    limit = torch.finfo(dtype).max
    return (x.float() * (1.0 / scale)).clamp(-limit, limit).to(dtype)


def store_kv_ref(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    for buf, x, scale in ((k_buffer, k, k_scale), (v_buffer, v, v_scale)):
        vals = quantize_kv_ref(x, buf.dtype, scale)
        if buf.dtype.itemsize == 1:  # FP8 is written as bytes (index_put has no float8 kernel everywhere)
            buf, vals = buf.view(torch.uint8), vals.view(torch.uint8)
        buf[slots] = vals
