"""A real GGUF file with K-quant layers, end to end on the CPU: the default model's file rewritten by the
gguf package's writer with blk.0.ffn_down as Q6_K and blk.1.ffn_down as Q4_K (block bytes from
tests/fixtures/gguf_blocks.py; the rest copied as published, token_embd stays Q8_0), converted, then
loaded with --quantization gguf: the converter keeps both layers' blocks, Q4_K stays 4-bit (the int4
planes), Q6_K loads dequantized (gguf's values) with a logged note, and the logits follow the same
file loaded dequantized in float32 as closely as the 4-bit CPU path does elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402

from radixlm.runtime.gguf_convert import GGUF_BLOCKS_FILE, convert_gguf  # noqa: E402
from radixlm.runtime.model_runner import ModelRunner  # noqa: E402
from radixlm.runtime.model_source import default_gguf_path  # noqa: E402
from radixlm.runtime.quantization.int4_cpu import Int4PackedWeight, int4_cpu_kernel_available  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402
from radixlm.tests.fixtures.gguf_blocks import gguf_blocks, gguf_reference  # noqa: E402
from tests.runtime.test_model_logits import _forward_all_positions  # noqa: E402

REPLACED = {"blk.0.ffn_down.weight": QType.Q6_K, "blk.1.ffn_down.weight": QType.Q4_K}


def _rewrite(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """src with the REPLACED tensors in their new type; returns those tensors' gguf dequantization."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    refs = {}
    for i, t in enumerate(reader.tensors):
        rows, cols = int(t.shape[-1]) if len(t.shape) > 1 else 1, int(t.shape[0])
        if t.name in REPLACED:
            qtype = REPLACED[t.name]
            raw = gguf_blocks(qtype, rows, cols, seed=i)
            refs[t.name] = gguf_reference(qtype, raw, rows, cols)
            writer.add_tensor(t.name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return refs


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("kquant")
    refs = _rewrite(default_gguf_path(), root / "kquant.gguf")
    return convert_gguf(root / "kquant.gguf", root / "converted", progress=False), refs


def _runner(folder: Path, **options) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=str(folder), max_total_tokens=2048, device="cpu", **options).resolve(), folder)


@pytest.mark.skipif(not int4_cpu_kernel_available(), reason="torch lacks the packed int4 CPU matmul")
def test_k_quant_layers_load_as_stated_and_logits_follow_float32(kquant_model, caplog) -> None:
    from safetensors import safe_open

    folder, refs = kquant_model
    with safe_open(str(folder / GGUF_BLOCKS_FILE), framework="np") as f:
        types = f.metadata()
    assert types["model.layers.0.mlp.down_proj.weight"].startswith("Q6_K:")
    assert types["model.layers.1.mlp.down_proj.weight"].startswith("Q4_K:")
    with caplog.at_level(logging.INFO, logger="radixlm.runtime.quantization.select"):
        packed = _runner(folder, quantization="gguf", dtype="float32")
    plain = _runner(folder, quantization="none", dtype="float32")
    down0, down1 = (packed.model.layers[i].mlp.down_proj for i in (0, 1))
    assert down0.quantized is None and "Q6_K load dequantized on the CPU" in caplog.text
    assert torch.equal(down0.weight, torch.from_numpy(refs["blk.0.ffn_down.weight"]))
    assert isinstance(down1.quantized, Int4PackedWeight) and "Q4_K" in down1.quantized.format
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, torch.from_numpy(refs["blk.1.ffn_down.weight"]))
    prompts = [[1, 504, 3458, 314, 253, 1345, 30, 2], list(range(100, 140))]
    ours = _forward_all_positions(packed, prompts, chunks=[64])
    ref = _forward_all_positions(plain, prompts, chunks=[64])
    for a, b in zip(ours, ref):
        lp_a, lp_b = torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1)
        top = lp_b.argmax(-1)
        assert (lp_a.gather(-1, top[:, None]) - lp_b.gather(-1, top[:, None])).abs().max() < 0.25  # nats
