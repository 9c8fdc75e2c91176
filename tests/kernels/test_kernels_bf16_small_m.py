"""The bf16 / fp16 2..16-row linear (kernels/bf16_small_m.py; the CPU interpreter without CUDA) against a float64
product: one launch, split-K finished by the last split, row / column / K tails; the tickets back at zero and a
repeated call bit-equal; "de" (first tile before the PDL wait) giving "dot"'s bits; SiLU-and-mul in the loads;
what it refuses; the table lookup by row count ("cublas" keeps torch's product) and the linear layers' dispatch of
a verify step's rows (runtime/dense_small_m.py)."""
from __future__ import annotations

import json

import pytest
import torch

from radixlm.kernels import small_m
from radixlm.kernels.bf16_small_m import bf16_small_m, config_for
from radixlm.kernels.small_m import SmallMConfig, plan, tickets_for
from radixlm.runtime.dense_small_m import DenseSmallM, attach_dense_small_m
from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear

CONFIGS = [SmallMConfig("dot", 16, 64, 1, 1, 2), SmallMConfig("dot", 32, 64, 3, 2, 2), SmallMConfig("de", 16, 128, 2, 1, 2),
           SmallMConfig("de", 32, 64, 1, 2, 1)]


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """Each output is the exact product rounded to the output dtype, or its neighbour (float32 sums)."""
    ulp = torch.finfo(got.dtype).eps * exact.abs().clamp_min(torch.finfo(got.dtype).tiny)
    return bool(((got.double() - exact).abs() <= 1.01 * ulp + 1e-6 * exact.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 256), (37, 300)])
def test_small_m_matches_float64_product(device, dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(device)
    tickets = tickets_for(n, torch.device(device))
    for m in (2, 3, 5, 16):
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        exact = (x.double() @ w.double().T).cpu()
        for cfg in CONFIGS:
            got = bf16_small_m(x, w, cfg, tickets)
            assert got.dtype == dtype and got.shape == (m, n)
            assert _within_one_ulp(got.cpu(), exact), (m, cfg.key())
            assert not tickets.any()  # every row tile's last split reset its ticket
            assert torch.equal(got, bf16_small_m(x, w, cfg, tickets))  # fixed summation order
    assert plan(k, CONFIGS[1])[0] > 1  # the split-K path ran
    x = torch.randn(4, k, generator=g).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    assert torch.equal(bf16_small_m(x, w, CONFIGS[0], None, bias), bf16_small_m(x, w, CONFIGS[0]) + bias)


@pytest.mark.parametrize("k", [256, 200])
def test_early_first_tile_gives_the_bits_of_dot(device, k):
    """"de" loads its first weight tile before the PDL wait, then sums the same tiles in the same order."""
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(48, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    x = torch.randn(5, k, generator=g).to(torch.bfloat16).to(device)
    for n, bk, split in [(16, 64, 1), (32, 64, 2), (16, 256, 1)]:
        assert torch.equal(bf16_small_m(x, w, SmallMConfig("de", n, bk, split, 1, 2)),
                           bf16_small_m(x, w, SmallMConfig("dot", n, bk, split, 1, 2))), (n, bk, split)


@pytest.mark.parametrize("k", [256, 200])
def test_silu_mul_in_the_loads_equals_the_activation_kernel_then_the_product(device, k):
    from radixlm.kernels.ops import silu_and_mul

    g = torch.Generator().manual_seed(k + 1)
    w = (torch.randn(40, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    gate_up = (torch.randn(3, 2 * k, generator=g) * 3).to(torch.bfloat16).to(device)
    for cfg in CONFIGS:
        assert torch.equal(bf16_small_m(gate_up, w, cfg, silu_mul=True), bf16_small_m(silu_and_mul(gate_up), w, cfg)), cfg.key()
    with pytest.raises(ValueError, match="does not fit"):
        bf16_small_m(gate_up[:, :k], w, CONFIGS[0], silu_mul=True)  # not [gate | up]


def test_small_m_refuses_what_it_cannot_take(device):
    w = torch.randn(32, 128, dtype=torch.bfloat16, device=device)
    cfg = CONFIGS[0]
    for rows in (1, 17):  # one row is the GEMV's; above 16, torch's
        with pytest.raises(ValueError, match="does not fit"):
            bf16_small_m(torch.randn(rows, 128, dtype=torch.bfloat16, device=device), w, cfg)
    with pytest.raises(ValueError, match="does not fit"):
        bf16_small_m(torch.randn(2, 128, dtype=torch.float16, device=device), w, cfg)  # dtypes differ
    with pytest.raises(ValueError, match="takes bf16"):
        bf16_small_m(torch.randn(2, 128, device=device), w.float(), cfg)  # float32 keeps torch's exact product
    for bad in (SmallMConfig("gemv", 16, 128), SmallMConfig("dot", 8, 128)):  # no such kind; a tensor-core tile < 16 rows
        with pytest.raises(ValueError, match="takes bf16"):
            bf16_small_m(torch.randn(2, 128, dtype=torch.bfloat16, device=device), w, bad)


def test_table_lookup_by_row_count(tmp_path, monkeypatch):
    path = tmp_path / "sweep.json"
    dot, de = "dot-n16-k128-s2-w1-st3", "de-n32-k64-s1-w2-st2"
    path.write_text(json.dumps({"tables": {"bf16m": {"48x256": {"4": dot, "8": "cublas", "16": de}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    assert [config_for(m, 48, 256) for m in (2, 4)] == [SmallMConfig.parse(dot)] * 2
    assert [config_for(m, 48, 256) for m in (5, 8)] == [None, None]  # measured slower than cuBLAS
    assert config_for(12, 48, 256) == SmallMConfig.parse(de)
    assert config_for(1, 48, 256) is None and config_for(17, 48, 256) is None  # the GEMV's, torch's
    assert config_for(4, 64, 256) is None  # never measured
    monkeypatch.setenv(small_m.TABLE_ENV, "off")
    assert config_for(4, 48, 256) is None  # the defaults


def test_linear_layers_take_the_kernel_for_the_row_counts_it_serves(device, tmp_path, monkeypatch):
    from radixlm.kernels.ops import silu_and_mul

    torch.manual_seed(0)
    col = ColumnParallelLinear(256, 48, bias=True).to(torch.bfloat16).to(device)
    row = RowParallelLinear(256, 48).to(torch.bfloat16).to(device)
    cfg = SmallMConfig("dot", 16, 128, 2, 1, 2)
    x1, x3, x9 = (torch.randn(m, 256, dtype=torch.bfloat16, device=device) for m in (1, 3, 9))
    with torch.no_grad():
        plain = {m: (col(x), row(x)) for m, x in ((1, x1), (3, x3), (9, x9))}
        col.small_m = DenseSmallM(col.weight, {2: cfg, 3: cfg, 4: cfg})
        row.small_m = DenseSmallM(row.weight, {3: cfg})
        assert torch.equal(col(x3), bf16_small_m(x3, col.weight, cfg, None, col.bias))
        assert torch.equal(row(x3), bf16_small_m(x3, row.weight, cfg))
        assert not torch.equal(row(x3), plain[3][1])  # (another summation order than torch's: the kernel ran)
        for m, x in ((1, x1), (9, x9)):  # rows it does not serve: torch's product
            assert torch.equal(col(x), plain[m][0]) and torch.equal(row(x), plain[m][1])
        gate_up = torch.randn(3, 512, dtype=torch.bfloat16, device=device)
        assert row.forward_silu_mul(gate_up) is None  # (slower fused: the activation kernel, then the kernel)
        assert torch.equal(row(silu_and_mul(gate_up)), bf16_small_m(silu_and_mul(gate_up), row.weight, cfg))

    # attach: only CUDA half-precision weights of a measured shape get one (and others lose a stale one)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"bf16m": {"48x256": {"8": cfg.key()}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    model = torch.nn.Sequential(col, row, ColumnParallelLinear(256, 48, bias=False).to(device))  # the last one float32
    names = attach_dense_small_m(model)
    assert names == (["1"] if device == "cuda" else [])  # "0" has a bias
    assert col.small_m is None and model[2].small_m is None
    if device == "cuda":
        assert sorted(row.small_m.configs) == list(range(2, 9))
    else:
        assert row.small_m is None


@pytest.mark.parametrize("k", [256, 200])
def test_fma_kinds_give_each_row_the_m1_gemvs_bits(device, k):
    """"fma" / "fe" (up to 4 rows, CUDA cores): each row's output equals the M = 1 GEMV's for that row alone under
    the same config (its loop per row: a verify row's linears compute what a decode step's compute), the SiLU-and-mul
    loads too; a fifth row is refused."""
    from radixlm.kernels.bf16_gemv import bf16_gemv

    g = torch.Generator().manual_seed(k + 2)
    w = (torch.randn(40, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    for kind, n, bk, split, warps in [("fma", 8, 64, 1, 2), ("fe", 8, 64, 3, 2), ("fma", 16, 128, 2, 4), ("fe", 8, 256, 1, 4)]:
        cfg = SmallMConfig(kind, n, bk, split, warps, 2)
        gemv_cfg = SmallMConfig("fma", n, bk, split, warps, 2)
        for m in (2, 3, 4):
            x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(device)
            want = torch.cat([bf16_gemv(x[i : i + 1], w, gemv_cfg) for i in range(m)])
            assert torch.equal(bf16_small_m(x, w, cfg), want), (cfg.key(), m)
        gate_up = (torch.randn(3, 2 * k, generator=g) * 3).to(torch.bfloat16).to(device)
        want = torch.cat([bf16_gemv(gate_up[i : i + 1], w, gemv_cfg, silu_mul=True) for i in range(3)])
        assert torch.equal(bf16_small_m(gate_up, w, cfg, silu_mul=True), want), cfg.key()
    with pytest.raises(ValueError, match="up to 4 rows"):
        bf16_small_m(torch.randn(5, k, generator=g).to(torch.bfloat16).to(device), w, SmallMConfig("fma", 8, 64, 1, 2, 2))


def test_the_lm_head_takes_the_small_m_kernel_where_it_has_one(tiny_model_dir):
    """An untied LM head is a column-parallel linear: the logits of 2..16 rows take its small-M kernel (a verify step's
    rows; attached where the table names the head's shape), other row counts and tied heads torch's product."""
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.server_args import ServerArgs

    model_dir = tiny_model_dir("llama")
    runner = ModelRunner(ServerArgs(model_path=str(model_dir), dtype="bfloat16", max_total_tokens=256,
                                    device="cpu").resolve(), model_dir)
    model, head = runner.model, runner.model.lm_head
    hidden = torch.randn(3, head.weight.shape[1], dtype=torch.bfloat16)
    plain = model.compute_logits(hidden)
    cfg = SmallMConfig("dot", 16, 32, 2, 1, 2)
    calls = []

    class Counted(DenseSmallM):
        def __call__(self, x, bias, silu_mul=False):
            calls.append(x.shape[0])
            return super().__call__(x, bias, silu_mul)
    head.small_m = Counted(head.weight, {3: cfg})
    try:
        got = model.compute_logits(hidden)
        assert calls == [3]
        assert got.dtype == torch.float32 and got.shape == plain.shape
        assert torch.equal(got, bf16_small_m(hidden, head.weight, cfg)[:, : model.cfg.vocab_size].float())
        assert torch.equal(model.compute_logits(hidden[:2]), plain[:2])  # 2 rows: no config, torch's product
        assert calls == [3]
    finally:
        head.small_m = None
