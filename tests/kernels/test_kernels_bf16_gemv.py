"""The bf16 / fp16 M = 1 GEMV (kernels/bf16_gemv.py; the CPU interpreter without CUDA) against a float64
product: one launch and split-K finished by the last split, row and column tails; the tickets back at zero and a
repeated call bit-equal; what it refuses; the table lookup ("cublas" keeps torch's product) and the linear
layers' dispatch of single rows (runtime/dense_gemv.py)."""
from __future__ import annotations

import json

import pytest
import torch

from radixlm.kernels import small_m
from radixlm.kernels.bf16_gemv import bf16_gemv, config_for, gemv_tickets
from radixlm.kernels.small_m import SmallMConfig, plan
from radixlm.runtime.dense_gemv import DenseGemv, attach_dense_gemv
from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear

CONFIGS = [SmallMConfig("fma", 8, 128, 1, 4, 2), SmallMConfig("fma", 8, 64, 3, 2, 2), SmallMConfig("fma", 16, 128, 2, 4, 1),
           SmallMConfig("pf", 8, 128, 1, 4, 1), SmallMConfig("pf", 8, 64, 3, 2, 1), SmallMConfig("pf", 4, 128, 2, 2, 1)]


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """Each output is the exact product rounded to the output dtype, or its neighbour (float32 sums)."""
    ulp = torch.finfo(got.dtype).eps * exact.abs().clamp_min(torch.finfo(got.dtype).tiny)
    return bool(((got.double() - exact).abs() <= 1.01 * ulp + 1e-6 * exact.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 512), (37, 300), (24, 1024)])
def test_bf16_gemv_matches_float64_product(device, dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(device)
    x = torch.randn(1, k, generator=g).to(dtype).to(device)
    exact = (x.double() @ w.double().T).cpu()
    tickets = gemv_tickets(n, SmallMConfig(block_n=4), torch.device(device))  # enough for every config's row tiles
    for cfg in CONFIGS:
        got = bf16_gemv(x, w, cfg, tickets)
        assert got.dtype == dtype and got.shape == (1, n)
        assert _within_one_ulp(got.cpu(), exact), cfg.key()
        assert not tickets.any()  # every row tile's last split reset its ticket
        assert torch.equal(got, bf16_gemv(x, w, cfg, tickets))  # fixed summation order
    assert plan(k, CONFIGS[1])[0] > 1  # the split-K path ran
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    assert torch.equal(bf16_gemv(x, w, CONFIGS[0], tickets, bias), bf16_gemv(x, w, CONFIGS[0], tickets) + bias)


@pytest.mark.parametrize("k", [512, 300])
def test_silu_mul_in_the_loads_equals_the_activation_kernel_then_the_gemv(device, k):
    """The down projection's prologue: the bits of ops.silu_and_mul (Triton), then the GEMV."""
    from radixlm.kernels.ops import silu_and_mul

    g = torch.Generator().manual_seed(k)
    w = (torch.randn(40, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    gate_up = (torch.randn(1, 2 * k, generator=g) * 3).to(torch.bfloat16).to(device)
    for cfg in CONFIGS:
        assert torch.equal(bf16_gemv(gate_up, w, cfg, silu_mul=True), bf16_gemv(silu_and_mul(gate_up), w, cfg)), cfg.key()
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(gate_up[:, :k], w, CONFIGS[0], silu_mul=True)  # not [gate | up]


@pytest.mark.parametrize("k", [1024, 300, 64])
def test_prefetching_kind_gives_the_bits_of_the_plain_one(device, k):
    """"pf" (next tile in flight, first tile before the PDL wait) sums the same products in the same order as
    "fma": equal outputs for one split, several, a single step per split, and a K tail."""
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(24, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(device)
    for n, bk, split in [(8, 64, 1), (8, 64, 4), (4, 128, 2), (8, 512, 1)]:
        plain = bf16_gemv(x, w, SmallMConfig("fma", n, bk, split, 2, 1))
        assert torch.equal(bf16_gemv(x, w, SmallMConfig("pf", n, bk, split, 2, 1)), plain), (n, bk, split)


def test_bf16_gemv_refuses_what_it_cannot_take(device):
    w = torch.randn(16, 128, dtype=torch.bfloat16, device=device)
    cfg = CONFIGS[0]
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(torch.randn(2, 128, dtype=torch.bfloat16, device=device), w, cfg)  # M = 2
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(torch.randn(1, 128, dtype=torch.float16, device=device), w, cfg)  # dtypes differ
    with pytest.raises(ValueError, match="takes bf16"):
        bf16_gemv(torch.randn(1, 128, device=device), w.float(), cfg)  # float32 keeps torch's exact product
    with pytest.raises(ValueError, match="takes bf16"):
        bf16_gemv(torch.randn(1, 128, dtype=torch.bfloat16, device=device), w, SmallMConfig("dot", 16, 128))


def test_table_lookup_and_cublas_entries(tmp_path, monkeypatch):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"bf16": {"48x256": {"1": "fma-n8-k128-s2-w4-st2"}, "32x256": {"1": "cublas"}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    assert config_for(48, 256) == SmallMConfig("fma", 8, 128, 2, 4, 2)
    assert config_for(32, 256) is None  # measured slower than cuBLAS
    assert config_for(64, 256) is None  # never measured
    monkeypatch.setenv(small_m.TABLE_ENV, "off")
    assert config_for(48, 256) is None  # the defaults (no entry for this shape)


def test_linear_layers_take_the_gemv_for_single_rows_only(device, tmp_path, monkeypatch):
    torch.manual_seed(0)
    col = ColumnParallelLinear(256, 48, bias=True).to(torch.bfloat16).to(device)
    row = RowParallelLinear(256, 48).to(torch.bfloat16).to(device)
    cfg = SmallMConfig("fma", 8, 128, 2, 4, 2)
    x1 = torch.randn(1, 256, dtype=torch.bfloat16, device=device)
    x3 = torch.randn(3, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        plain3, plain_row = col(x3), row(x3)
        col.gemv, row.gemv = DenseGemv(col.weight, cfg), DenseGemv(row.weight, cfg)
        assert torch.equal(col(x1), bf16_gemv(x1, col.weight, cfg, None, col.bias))
        assert torch.equal(row(x1), bf16_gemv(x1, row.weight, cfg))
        assert torch.equal(col(x3), plain3) and torch.equal(row(x3), plain_row)  # M > 1: torch's product
        gate_up = torch.randn(1, 512, dtype=torch.bfloat16, device=device)
        assert torch.equal(row.forward_silu_mul(gate_up), bf16_gemv(gate_up, row.weight, cfg, silu_mul=True))
        assert row.forward_silu_mul(torch.randn(2, 512, dtype=torch.bfloat16, device=device)) is None

    # attach: only CUDA half-precision weights of a measured shape get one (and others lose a stale one)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"bf16": {"48x256": {"1": cfg.key()}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    model = torch.nn.Sequential(col, row, ColumnParallelLinear(256, 32, bias=False).to(torch.bfloat16).to(device),
                                ColumnParallelLinear(256, 48, bias=False).to(device))  # the last one float32
    names = attach_dense_gemv(model)
    assert names == (["1"] if device == "cuda" else [])  # "0" has a bias
    assert col.gemv is None and model[2].gemv is None and model[3].gemv is None
    if device != "cuda":
        assert row.gemv is None
