"""Packed CPU weights shared by the loads of one converted GGUF file in one process: the same object for
the same origin, a fresh one for another file/rows or a changed file, nothing kept once no model uses it
unless a hold() is open; and a model loaded from the cache computes what a fresh load computes."""
from __future__ import annotations

import gc

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization import packed_cache
from radixlm.runtime.quantization.select import GGUFTensor, build_quantized_weight
from tests.fixtures.gguf_blocks import gguf_blocks


def _part(origin, seed: int = 0) -> GGUFTensor:
    return GGUFTensor(QType.Q4_1, gguf_blocks(QType.Q4_1, 64, 128, seed), (64, 128), origin)


@pytest.fixture
def no_hold(monkeypatch):
    """Outside the suite's session-long hold (tests/conftest.py)."""
    monkeypatch.setattr(packed_cache, "_held", [])


def test_same_origin_shares_the_packed_weight_while_a_model_holds_it(no_hold) -> None:
    a = build_quantized_weight([_part(("f", 1, 2, "q")), _part(("f", 1, 2, "k"), 1)])
    b = build_quantized_weight([_part(("f", 1, 2, "q")), _part(("f", 1, 2, "k"), 1)])
    assert a is b
    assert build_quantized_weight([_part(("f", 1, 3, "q")), _part(("f", 1, 3, "k"), 1)]) is not a  # file changed
    assert build_quantized_weight([_part(("f", 1, 2, "q"))]) is not a  # other parts
    assert build_quantized_weight([_part(None)]) is not build_quantized_weight([_part(None)])  # no origin: never cached
    rows = _part(("f", 1, 2, "q")).rows(0, 32)
    assert rows.origin == ("f", 1, 2, "q", 0, 32)
    del a, b
    gc.collect()
    assert packed_cache.lookup(("cpu", ("f", 1, 2, "q"), ("f", 1, 2, "k"))) is None  # weakly held


def test_hold_keeps_weights_no_model_uses(no_hold) -> None:
    key = ("cpu", ("h", 1, 2, "q"))
    with packed_cache.hold():
        build_quantized_weight([_part(key[1])])
        gc.collect()
        kept = packed_cache.lookup(key)
        assert kept is not None
        with packed_cache.hold():  # a nested hold keeps what the outer one holds, and closes on its own
            pass
        gc.collect()
        assert packed_cache.lookup(key) is kept
    del kept
    gc.collect()
    assert packed_cache.lookup(key) is None


def test_two_runners_of_one_file_share_packed_weights_and_agree(default_model_dir) -> None:
    """Two runners on the default model's folder (alive together) share every packed weight, the second
    built none of its own, and both compute the same logits."""
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.server_args import ServerArgs
    from tests.runtime.test_model_logits import _forward_all_positions

    args = ServerArgs(model_path=str(default_model_dir), device="cpu", max_total_tokens=256).resolve()
    first, second = ModelRunner(args, default_model_dir), ModelRunner(args, default_model_dir)

    def packed(runner):
        return [m.quantized for m in runner.model.modules() if getattr(m, "quantized", None) is not None]

    assert len(packed(first)) == 121 and all(a is b for a, b in zip(packed(first), packed(second), strict=True))
    ids = [1, 504, 3458, 282, 4649, 314, 216, 34, 30, 32]
    for a, b in zip(_forward_all_positions(first, [ids], [10]), _forward_all_positions(second, [ids], [10]), strict=True):
        assert torch.equal(a, b)
