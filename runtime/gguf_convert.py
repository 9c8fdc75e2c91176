"""Convert a llama.cpp GGUF checkpoint into a Hugging Face model folder.

The runtime's model loaders only understand HF folders (config.json, safetensors,
tokenizer files), so a GGUF file is turned into one up front: tensors are
dequantized to float32 with the `gguf` package and renamed to HF names, and the
llama.cpp-specific Q/K row permutation is undone. The folder appears atomically
(built in a sibling temp dir, then renamed) so concurrent readers never see a
half-written model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from safetensors.numpy import save_file
from tqdm.auto import tqdm

__all__ = [
    "PERMUTED_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_QUANT_TYPES",
    "UnsupportedGGUFError",
    "GGUF_BLOCKS_FILE",
    "convert_gguf",
    "hf_tensor_name",
    "unpermute_qk",
]

# GGUF `general.architecture` -> (HF model_type, HF architecture class).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# llama.cpp's converter interleaves Q/K rows (for its rotary kernel) only for the
# llama family; Qwen models keep HF's row order.
PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral"})

# Types `gguf.quants.dequantize` handles with plain numpy at a usable speed.
SUPPORTED_QUANT_TYPES: frozenset[QType] = frozenset(
    {
        QType.F32, QType.F16, QType.BF16,
        QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
        QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    }
)

# Per-layer GGUF tensor stem -> HF module path under `model.layers.N.`.
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Raw blocks of the tensors `runtime/quantization` can keep packed (uint8 [rows, bytes per row], HF
# names and row order; the GGUF type name of each in the metadata): read by gguf_weights.py, so a
# quantized load never re-parses the GGUF file (the gguf package takes seconds on its metadata).
GGUF_BLOCKS_FILE = "gguf-blocks.st"  # safetensors format; not *.safetensors, which loaders glob

# Bound peak memory for large models: tensors are flushed to a new shard past this.
_SHARD_BYTES = 4 << 30


class UnsupportedGGUFError(ValueError):
    """The GGUF file uses an architecture, tensor or quantization we cannot convert."""


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave so rotary halves match HF's layout.

    llama.cpp stores each head's rows as (pair, 2) interleaved; HF stores the
    first rotary half then the second. Works for weights (rows, cols) and biases.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    split = weight.reshape(n_head, half, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Write an HF folder (config, float32 safetensors, tokenizer) for `gguf_path`.

    Returns `out_dir`. If another process finished the same folder first, its
    result is kept and ours discarded; an unrelated existing folder is an error.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    arch = _architecture(reader, gguf_path)
    _check_tensors(reader, gguf_path)
    config = _build_config(reader, arch)
    generation = _generation_config(reader, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_weights(reader, arch, config, tmp, gguf_path.name, progress)
        _write_blocks(reader, arch, config, tmp)
        del reader  # release the memory map before the tokenizer re-reads the file
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        _write_tokenizer(gguf_path, tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if (out_dir / "config.json").is_file():
                return out_dir  # a concurrent conversion won the race
            raise FileExistsError(f"{out_dir} exists and is not a converted model folder")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32; recover the short decimal (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _architecture(reader: gguf.GGUFReader, gguf_path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{gguf_path}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def _check_tensors(reader: gguf.GGUFReader, gguf_path: Path) -> None:
    """Fail before any work if a tensor would be dropped or cannot be dequantized."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_QUANT_TYPES))
            raise UnsupportedGGUFError(
                f"{gguf_path}: tensor {tensor.name} uses quantization type "
                f"{tensor.tensor_type.name}, which is not supported; supported: {supported}"
            )
        if tensor.name == "rope_freqs.weight":
            raise UnsupportedGGUFError(
                f"{gguf_path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3 style "
                "rope scaling) are not supported"
            )
        if hf_tensor_name(tensor.name) is None:
            raise UnsupportedGGUFError(f"{gguf_path}: unexpected tensor {tensor.name}")
    missing = {"token_embd.weight", "output_norm.weight"} - {t.name for t in reader.tensors}
    if missing:
        raise UnsupportedGGUFError(f"{gguf_path}: missing tensors {', '.join(sorted(missing))}")


def hf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_RE.match(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, stem, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[stem]}.{kind}"


def _build_config(reader: gguf.GGUFReader, arch: str) -> dict[str, Any]:
    """HF config.json fields from the GGUF metadata (`{arch}.*` and tokenizer ids)."""
    model_type, hf_class = SUPPORTED_ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    def required(key: str) -> int:
        value = meta(key)
        if value is None:
            raise UnsupportedGGUFError(f"GGUF metadata {arch}.{key} is missing")
        return int(value)

    hidden = required("embedding_length")
    heads = required("attention.head_count")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = meta("vocab_size") or int(embed.shape[-1])
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": required("context_length"),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch in ("llama", "mistral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    for key, name in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
        ("unk_token_id", "unknown"),
    ):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: Any) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedGGUFError(f"rope scaling type {kind!r} is not supported")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(meta("rope.scaling.factor", 1.0))}
    original = meta("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _generation_config(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """Stop on end-of-turn as well as end-of-text, as llama.cpp does."""
    eos = config.get("eos_token_id")
    eot = _field(reader, gguf.Keys.Tokenizer.EOT_ID)
    if eot is not None and int(eot) != eos:
        eos = [eos, int(eot)] if eos is not None else int(eot)
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos}
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    return {key: value for key, value in generation.items() if value is not None}


def _dequantized(
    reader: gguf.GGUFReader, arch: str, config: dict[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF (out, in) layout) for every tensor."""
    heads = config["num_attention_heads"]
    kv_heads = config["num_key_value_heads"]
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if arch in PERMUTED_ARCHITECTURES:
            if ".attn_q." in tensor.name:
                array = unpermute_qk(array, heads)
            elif ".attn_k." in tensor.name:
                array = unpermute_qk(array, kv_heads)
        name = hf_tensor_name(tensor.name)
        assert name is not None  # guaranteed by _check_tensors
        yield name, np.ascontiguousarray(array, dtype=np.float32)


def _write_blocks(reader: gguf.GGUFReader, arch: str, config: dict[str, Any], folder: Path) -> None:
    from radixlm.runtime.quantization.gguf_blocks import KEPT_QTYPES  # numpy only: no cycle, no torch op

    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if tensor.tensor_type not in KEPT_QTYPES or len(shape) != 2:
            continue
        raw = np.asarray(tensor.data).view(np.uint8).reshape(shape[0], -1)
        if arch in PERMUTED_ARCHITECTURES and ".attn_q." in tensor.name:
            raw = unpermute_qk(raw, config["num_attention_heads"])
        elif arch in PERMUTED_ARCHITECTURES and ".attn_k." in tensor.name:
            raw = unpermute_qk(raw, config["num_key_value_heads"])
        name = hf_tensor_name(tensor.name)
        assert name is not None  # guaranteed by _check_tensors
        tensors[name] = np.ascontiguousarray(raw)
        types[name] = f"{tensor.tensor_type.name}:{shape[1]}"
    if tensors:
        save_file(tensors, str(folder / GGUF_BLOCKS_FILE), metadata=types)
        (folder / GGUF_BLOCKS_FILE).chmod(0o644)


def _write_weights(
    reader: gguf.GGUFReader,
    arch: str,
    config: dict[str, Any],
    folder: Path,
    label: str,
    progress: bool,
) -> None:
    """Write safetensors shards: one `model.safetensors` unless the model is large."""
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0
    shard_files: list[Path] = []
    weight_map: dict[str, int] = {}
    total_bytes = 0
    tensors = tqdm(
        _dequantized(reader, arch, config),
        total=len(reader.tensors),
        desc=f"Converting {label}",
        unit="tensor",
        disable=not progress,
    )
    for name, array in tensors:
        if shard and shard_bytes + array.nbytes > _SHARD_BYTES:
            shard_files.append(_save_shard(shard, folder, len(shard_files)))
            shard, shard_bytes = {}, 0
        shard[name] = array
        shard_bytes += array.nbytes
        total_bytes += array.nbytes
        weight_map[name] = len(shard_files)
    shard_files.append(_save_shard(shard, folder, len(shard_files)))

    if len(shard_files) == 1:
        os.replace(shard_files[0], folder / "model.safetensors")
        return
    final = [f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors" for i in range(len(shard_files))]
    for path, name in zip(shard_files, final):
        os.replace(path, folder / name)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final[i] for name, i in sorted(weight_map.items())},
    }
    _write_json(folder / "model.safetensors.index.json", index)


def _save_shard(tensors: dict[str, np.ndarray], folder: Path, index: int) -> Path:
    path = folder / f".shard-{index}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates 0600; the server may run as another user
    return path


def _write_tokenizer(gguf_path: Path, folder: Path) -> None:
    """Rebuild the tokenizer and chat template from GGUF metadata via transformers."""
    from transformers import AutoTokenizer  # deferred: slow import, only needed here

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(folder)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
