"""LoRA adapters (made by peft) in our model against transformers + PEFT, and batches mixing them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs
from tests.fixtures.lora_adapters import make_peft_adapter, peft_model


def _runner(model_dir: Path, adapters: dict[str, Path], **options) -> ModelRunner:
    paths = tuple(f"{n}={p}" for n, p in adapters.items())
    args = ServerArgs(model_path=str(model_dir), max_total_tokens=4096, device="cpu", lora_paths=paths or None,
                      enable_lora=True, **options).resolve()
    return ModelRunner(args, model_dir)


def _forward(runner: ModelRunner, prompts: list[list[int]], names: list[str | None]) -> list[torch.Tensor]:
    """Logits at every prompt position, all prompts in one extend batch, then one decode step for all
    (the first token re-fed); returns per prompt [len + 1, vocab]."""
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    reqs = []
    for i, (ids, name) in enumerate(zip(prompts, names)):
        req = Req(str(i), list(ids), SamplingParams(), 0, lora_name=name)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        req.slots = runner.kv_pool.alloc(len(ids) + 1)
        batch.add(req, req.slots[: len(ids)], prefix_len=0)
        reqs.append(req)
    fb, writes = batch.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(writes)
    fb.logits_indices = torch.arange(fb.num_tokens)
    out = runner.forward(fb)
    for req in reqs:
        req.output_ids = [req.input_ids[0]]
    dec = ScheduledBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), [len(r.input_ids) for r in reqs],
                         new_slots=[r.slots[len(r.input_ids):] for r in reqs])
    fb, writes = dec.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(writes)
    last = runner.forward(fb)
    result, start = [], 0
    for i, ids in enumerate(prompts):
        result.append(torch.cat([out[start:start + len(ids)], last[i:i + 1]]))
        start += len(ids)
    for req in reqs:
        runner.kv_pool.free(req.slots)
        runner.req_to_token_pool.free(req.req_pool_idx)
    return result


def _reference(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids + [ids[0]]])).logits[0].float()


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_adapter_logits_match_peft_merged_and_unmerged(tiny_model_dir, tmp_path, kind: str) -> None:
    model_dir = tiny_model_dir(kind)
    adapter = make_peft_adapter(model_dir, tmp_path / "a", seed=3, r=8, alpha=16,
                                rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3.0})
    runner = _runner(model_dir, {"a": adapter})
    prompts = _prompts(runner.vocab_size, (5, 23))
    ours = _forward(runner, prompts, ["a", "a"])
    base = _forward(runner, prompts, [None, None])
    for merged in (False, True):
        ref_model = peft_model(model_dir, adapter, merged)
        for ids, got, plain in zip(prompts, ours, base):
            ref = _reference(ref_model, ids)
            assert (ref - plain).abs().max() > 0.5, "the adapter must change the logits"
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_rslora_and_partial_targets(tiny_model_dir, tmp_path) -> None:
    model_dir = tiny_model_dir("llama")
    adapter = make_peft_adapter(model_dir, tmp_path / "rs", seed=5, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                use_rslora=True)
    runner = _runner(model_dir, {"rs": adapter})
    prompts = _prompts(runner.vocab_size, (11,))
    got = _forward(runner, prompts, ["rs"])[0]
    ref = _reference(peft_model(model_dir, adapter, merged=False), prompts[0])
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_batch_mixing_four_adapters_and_base_equals_each_alone(tiny_model_dir, tmp_path) -> None:
    model_dir = tiny_model_dir("llama")
    adapters = {f"a{i}": make_peft_adapter(model_dir, tmp_path / f"a{i}", seed=10 + i, r=4 + 4 * (i % 2))
                for i in range(4)}
    runner = _runner(model_dir, adapters, max_loras_per_batch=4)
    names = ["a0", None, "a1", "a2", None, "a3", "a1"]
    prompts = _prompts(runner.vocab_size, (7, 3, 12, 5, 9, 4, 6), seed=2)
    mixed = _forward(runner, prompts, names)
    for ids, name, got in zip(prompts, names, mixed):
        alone = _forward(runner, [ids], [name])[0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def _adapter_with(tmp_path: Path, base: Path, edit) -> Path:
    """A copy of adapter folder `base` with its config and/or tensors changed by `edit`."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    config = json.loads((base / "adapter_config.json").read_text())
    tensors = load_file(str(base / "adapter_model.safetensors"))
    edit(config, tensors)
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_bad_adapters_fail_at_load_with_a_clear_error(tiny_model_dir, tmp_path) -> None:
    model_dir = tiny_model_dir("llama")
    good = make_peft_adapter(model_dir, tmp_path / "good", seed=1, r=4)
    bad = tmp_path / "bads"
    bad.mkdir()

    def wrong_rank(cfg, t):
        cfg["r"] = 8

    def missing_module(cfg, t):
        for k in [k for k in t if "down_proj" in k]:
            del t[k]

    def wrong_shape(cfg, t):
        key = next(k for k in t if "layers.0.mlp.up_proj.lora_A" in k)
        t[key] = torch.zeros(4, 65)

    def embedding_target(cfg, t):
        cfg["target_modules"] = ["q_proj", "embed_tokens"]

    cases = {wrong_rank: "adapter_config.json says r=8", missing_module: "target module 'down_proj'",
             wrong_shape: "do not fit this model's up_proj", embedding_target: "embed_tokens"}
    for edit, message in cases.items():
        folder = _adapter_with(bad, good, edit)
        with pytest.raises(ValueError, match=message) as err:
            _runner(model_dir, {"x": folder})
        assert str(folder) in str(err.value)
    with pytest.raises(ValueError, match="above --max-lora-rank 2"):
        _runner(model_dir, {"x": good}, max_lora_rank=2)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        _runner(model_dir, {"x": tmp_path})


def test_start_up_adapters_load_on_threads_in_order(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """--lora-paths are read a window of LOAD_THREADS at a time and registered in the given order (7
    names over windows of 3); with --max-loaded-loras 4 the first three leave host memory as they
    would one by one; a bad folder among good ones fails start-up naming it."""
    from radixlm.runtime.lora import manager

    monkeypatch.setattr(manager, "LOAD_THREADS", 3)
    model_dir = tiny_model_dir("llama")
    good = make_peft_adapter(model_dir, tmp_path / "good", seed=1, r=4)
    names = [f"a{i}" for i in range(7)]
    lora = _runner(model_dir, {n: good for n in names}, max_loaded_loras=4, max_loras_per_batch=2).lora
    assert list(lora.adapters) == names
    assert [lora.adapters[n].uid for n in names] == [f"{n}#{i}" for i, n in enumerate(names)]
    assert [n for n in names if lora.adapters[n].host is not None] == names[3:]
    with pytest.raises(ValueError, match="no adapter_config.json") as err:
        _runner(model_dir, {**{n: good for n in names[:4]}, "bad": tmp_path, "a5": good})
    assert str(tmp_path) in str(err.value)


def _decode_batch(names: list[str | None]) -> ForwardBatch:
    n = len(names)
    ones = torch.ones(n, dtype=torch.int64)
    return ForwardBatch(ForwardMode.DECODE, ones, ones, ones, ones, ones.int(), [0] * n, [1] * n, [1] * n,
                        ones.int(), torch.arange(n, dtype=torch.int32), torch.arange(n),
                        lora_names=names if any(names) else None)


def test_base_only_batches_skip_the_lora_path(tiny_model_dir, tmp_path) -> None:
    """No row with an adapter: no segments (eager projections return at once) and, under CUDA
    graphs, the manager says so (the runner replays the base-only graph) without touching the
    graph's segment buffers or any device slot."""
    model_dir = tiny_model_dir("llama")
    runner = _runner(model_dir, {"a": make_peft_adapter(model_dir, tmp_path / "a", seed=3, r=4)})
    lora = runner.lora
    lora.enable_graphs(4)
    lora._graph_buf.fill_(7)
    assert lora.prepare(_decode_batch([None, None]), graph=True) is False
    assert lora.pool.batch.segments is None
    assert bool((lora._graph_buf == 7).all()), "a base-only step writes no segment buffer"
    assert lora.info()["in_device_slots"] == [None] * 8
    assert lora.prepare(_decode_batch([None, None, None]), graph=False) is False
    assert lora.pool.batch.segments is None
    assert lora.prepare(_decode_batch([None, "a"]), graph=True) is True
    assert lora._graph_buf[:1].tolist() == [1] and lora.info()["in_device_slots"][0] == "a"
    assert lora.prepare(_decode_batch(["a", None]), graph=False) is True
    assert lora.pool.batch.segments is not None and lora.pool.batch.segments.host == [(0, 0, 1)]


@pytest.mark.parametrize("kernels", ["overlap", "stacked"])
def test_a_swap_replaces_the_whole_slot(tiny_model_dir, tmp_path, kernels: str) -> None:
    """One device slot: a full-rank adapter on every module, then a lower-rank one on three modules
    swapped into the same slot (one packed copy): the second must equal PEFT, i.e. nothing of the
    first is left in the parts it does not target or the ranks it does not have; and the slot's
    A / B views read the packed row where each projection's part lies. Stacked: each A is copied on
    from the packed row into the tail of its layer's stacked weight, under the unchanged base weight."""
    model_dir = tiny_model_dir("llama")
    full = make_peft_adapter(model_dir, tmp_path / "full", seed=7, r=8)
    part = make_peft_adapter(model_dir, tmp_path / "part", seed=8, r=4, targets=["k_proj", "up_proj", "down_proj"])
    base = _runner(model_dir, {}) if kernels == "stacked" else None
    runner = _runner(model_dir, {"full": full, "part": part}, max_loras_per_batch=1, lora_kernels=kernels)
    prompts = _prompts(runner.vocab_size, (9,), seed=4)
    _forward(runner, prompts, ["full"])
    assert runner.lora.info()["in_device_slots"] == ["full"]
    got = _forward(runner, prompts, ["part"])[0]
    assert runner.lora.info()["in_device_slots"] == ["part"]
    torch.testing.assert_close(got, _reference(peft_model(model_dir, part, merged=False), prompts[0]),
                               atol=2e-4, rtol=2e-4)
    from safetensors.torch import load_file

    weights = load_file(str(part / "adapter_model.safetensors"))
    a_k = next(v for k, v in weights.items() if "layers.1.self_attn.k_proj.lora_A" in k)
    qkv = runner.lora.pool.projections[(1, "qkv_proj")]
    rank = runner.lora.pool.rank
    assert torch.equal(qkv.a[0, rank:rank + 4], a_k) and not qkv.a[0, :rank].any() and not qkv.a[0, rank + 4:].any()
    assert runner.lora.pool.nbytes == runner.lora.pool.slot_numel * runner.lora.pool.buffer.element_size()
    if kernels == "overlap":
        assert qkv.a.data_ptr() >= runner.lora.pool.buffer.data_ptr()
        return
    layer = runner.model.layers[1].self_attn.qkv_proj
    assert qkv.stacked is not None and layer.weight.data_ptr() == qkv.stacked.data_ptr()
    assert qkv.a.data_ptr() == qkv.stacked[layer.weight.shape[0]:].data_ptr()
    assert torch.equal(layer.weight, base.model.layers[1].self_attn.qkv_proj.weight), "the base weight is unchanged"

