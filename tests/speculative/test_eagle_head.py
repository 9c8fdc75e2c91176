"""The EAGLE-3 head: its config and weights read in speculators' layout (and the original release's),
its paged forward equal to a plain torch reference and to speculators' own Eagle3DraftModel, the
target's aux hidden states equal to transformers' hidden_states, and the drafter's chains equal to
the reference run on the target's real hidden states of the whole verified history."""
from __future__ import annotations

import json

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.speculative.eagle_head import EagleHead, EagleHeadConfig
from radixlm.runtime.weight_loader import iter_safetensors
from tests.fixtures.eagle3_heads import ReferenceHead, build_eagle3_head, target_aux_hidden
from tests.runtime.helpers import greedy_req, make_scheduler


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-heads")
    return {
        "reduced": build_eagle3_head(target, root / "reduced", seed=1, draft_vocab_size=150, aux_layer_ids=[0, 1]),
        "full": build_eagle3_head(target, root / "full", seed=2, aux_layer_ids=[1, 0, 1], norm_before_residual=True),
        "embed": build_eagle3_head(target, root / "embed", seed=3, draft_vocab_size=200, aux_layer_ids=[0, 1],
                                   with_embedding=True),
        "legacy": build_eagle3_head(target, root / "legacy", seed=4, draft_vocab_size=120, aux_layer_ids=[0, 1],
                                    legacy=True),
    }


def target_embedding(target) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(target / "model.safetensors"))["model.embed_tokens.weight"].float()


def test_config_layouts_and_aux_layer_defaults(heads, tmp_path) -> None:
    cfg = EagleHeadConfig.from_folder(heads["reduced"])
    assert cfg.weight_prefix == "layers.0." and cfg.draft_vocab_size == 150 and cfg.aux_layer_ids == (0, 1)
    legacy = EagleHeadConfig.from_folder(heads["legacy"])
    assert legacy.weight_prefix == "midlayer." and legacy.draft_vocab_size == 120 and legacy.aux_layer_ids == (0, 1)
    default = EagleHeadConfig(**{**cfg.__dict__, "aux_layer_ids": None})
    assert default.aux_layers(32) == (2, 16, 29)  # speculators' default for a target without explicit ids
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        cfg.aux_layers(1)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="is not an EAGLE-3 head"):
        EagleHeadConfig.from_folder(tmp_path)


def test_missing_or_misshaped_weights_are_refused(heads, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(heads["reduced"] / "model.safetensors"))
    cfg = EagleHeadConfig.from_folder(heads["reduced"])
    head = EagleHead(cfg, has_embedding=False)
    bad = {k: v for k, v in weights.items() if k != "layers.0.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match="missing weights"):
        head.load_weights(bad.items())
    bad = {**weights, "d2t": weights["d2t"][:-1]}
    with pytest.raises(ValueError, match="d2t"):
        head.load_weights(bad.items())
    save_file(weights, str(tmp_path / "x.safetensors"))
    head.load_weights(iter_safetensors(heads["reduced"]))


def paged_head(head_dir, embed: torch.Tensor):
    """The head on the torch kernels with a one-layer pool of its own (float32, CPU)."""
    from safetensors import safe_open

    from radixlm.kernels import get_kernel_ops
    from radixlm.runtime.attention import PagedAttentionBackend
    from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool
    from radixlm.runtime.models.llama import rope_cos_sin_cache

    cfg = EagleHeadConfig.from_folder(head_dir)
    with safe_open(str(head_dir / "model.safetensors"), "pt") as f:
        has_embed = "embed_tokens.weight" in f.keys()
    head = EagleHead(cfg, has_embed)
    head.load_weights(iter_safetensors(head_dir))
    c = cfg.layer
    pool = TokenToKVPool(256, 1, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    rows = ReqToTokenPool(4, 256, "cpu")
    ops = get_kernel_ops(False)
    attn = PagedAttentionBackend(ops, rows, pool, c.head_dim**-0.5)
    cos_sin = rope_cos_sin_cache(c, 256)
    row = rows.alloc()
    table = head.embed_tokens if has_embed else embed

    def run(mode, ids, positions, hidden, start):
        slots = pool.alloc(len(ids))
        rows.write(row, start, slots)
        fb = ForwardBatch.for_rows(mode, ids, positions, slots, [row], [start + len(ids)], [len(ids)], torch.device("cpu"))
        fb.logits_indices = torch.arange(len(ids))
        attn.begin_forward(fb)
        with torch.no_grad():
            return head(fb, attn, ops, cos_sin, table[torch.tensor(ids)], hidden)

    return head, run


@pytest.mark.parametrize("name", ["reduced", "full", "embed", "legacy"])
def test_paged_head_equals_torch_reference(target, heads, name: str) -> None:
    """Extend over 11 entries, then two decode entries on the head's own hidden states: logits and
    hidden states equal the plain reference recomputed over the whole sequence."""
    embed = target_embedding(target)
    ref = ReferenceHead(heads[name], embed)
    head, run = paged_head(heads[name], embed)
    torch.manual_seed(0)
    n_aux = len(EagleHeadConfig.from_folder(heads[name]).aux_layer_ids)
    aux = torch.randn(11, n_aux * 64)
    ids = torch.randint(0, embed.shape[0], (13,)).tolist()
    positions = [p + 3 for p in range(13)]  # a gap before them: only relative positions matter
    with torch.no_grad():
        logits, out = run(ForwardMode.EXTEND, ids[:11], positions[:11], head.project(aux), 0)
    g = aux @ ref.w["fc.weight"].T
    ref_logits, ref_out = ref.forward(aux, ids[:11], positions[:11], hidden=g)
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    hidden, ref_g = out[-1:], torch.cat([g, ref_out[-1:]])
    for j in (11, 12):
        logits, step_out = run(ForwardMode.DECODE, [ids[j]], [positions[j]], hidden, j)
        ref_logits, ref_out = ref.forward(aux, ids[: j + 1], positions[: j + 1], hidden=ref_g)
        torch.testing.assert_close(logits, ref_logits[-1:], atol=2e-4, rtol=1e-4)
        hidden, ref_g = step_out, torch.cat([ref_g, ref_out[-1:]])
    if name in ("reduced", "legacy"):  # draft ids map into the target vocabulary through d2t
        draft = torch.arange(EagleHeadConfig.from_folder(heads[name]).draft_vocab_size)
        assert head.draft_to_target(draft).tolist() == [ref.to_target(int(d)) for d in draft]
        assert len(set(head.draft_to_target(draft).tolist())) == len(draft)


def speculators_eagle3():
    try:
        from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    except Exception:  # noqa: BLE001 - not installed, or its training-side imports (datasets, ...) are missing
        return None
    return Eagle3DraftModel, Eagle3SpeculatorConfig


@pytest.mark.skipif(speculators_eagle3() is None, reason="speculators (and its eagle3 module's imports) not installed")
@pytest.mark.parametrize("name", ["reduced", "full", "embed"])
def test_paged_head_equals_speculators_eagle3(target, heads, name: str) -> None:
    """speculators' own Eagle3DraftModel, loaded from the same folder, one TTT step over a sequence:
    the same draft logits at every position."""
    from safetensors.torch import load_file

    model_cls, config_cls = speculators_eagle3()
    config = config_cls.from_pretrained(str(heads[name]))
    config.transformer_layer_config._attn_implementation = "eager"
    model = model_cls(config).float().eval()
    state = load_file(str(heads[name] / "model.safetensors"))
    embed = target_embedding(target)
    state.setdefault("embed_tokens.weight", embed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"verifier_lm_head.weight", "verifier_norm.weight"}
    captured = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    torch.manual_seed(1)
    n_aux = len(config.eagle_aux_hidden_state_layer_ids)
    aux = torch.randn(1, 9, n_aux * 64)
    ids = torch.randint(0, embed.shape[0], (1, 9))
    positions = torch.arange(9)[None] + 1  # speculators' default: the input token's position
    with torch.no_grad():
        model(hidden_states=aux, input_ids=ids, document_ids=torch.zeros(1, 9, dtype=torch.long),
              position_ids=positions, ttt_steps=1)
    head, run = paged_head(heads[name], embed)
    with torch.no_grad():
        logits, _ = run(ForwardMode.EXTEND, ids[0].tolist(), positions[0].tolist(), head.project(aux[0]), 0)
    torch.testing.assert_close(logits, captured[0][0].float(), atol=2e-4, rtol=1e-4)


def test_target_aux_hidden_states_equal_transformers(target, heads) -> None:
    """The target keeps the input hidden states of the head's layers; transformers' hidden_states[l]."""
    sched = make_scheduler(target, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(heads["full"]))
    model = sched.runner.model
    assert model.aux_layers == (1, 0, 1)
    seen = []
    stash = sched.spec.eagle.stash
    sched.spec.eagle.stash = lambda reqs, pre, ext, aux: (seen.append((pre[0], ext[0], aux.clone())),
                                                          stash(reqs, pre, ext, aux))
    ids = list(range(5, 40))
    sched.handle(greedy_req("a", ids, 1))
    while not sched.idle:
        sched.step()
    (start, n, aux), = seen
    assert (start, n) == (0, len(ids))
    torch.testing.assert_close(aux, target_aux_hidden(target, ids, [1, 0, 1]), atol=1e-4, rtol=1e-4)
    plain = make_scheduler(target)
    assert plain.runner.model.aux_layers == () and plain.runner.model.aux_hidden is None


@pytest.mark.parametrize("name", ["reduced", "embed"])
def test_drafts_equal_the_reference_on_the_verified_history(target, heads, name: str) -> None:
    """Every chain the drafter proposes equals the reference head run from scratch on transformers'
    hidden states of the request's whole prompt + output (no radix hits: every position was computed)."""
    embed = target_embedding(target)
    ref = ReferenceHead(heads[name], embed)
    sched = make_scheduler(target, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(heads[name]),
                           speculative_num_steps=3, disable_radix_cache=True, chunked_prefill_size=16)
    sched.spec.beta = 0.005  # price drafts as on a GPU: full-depth chains at first
    drafter = sched.spec.eagle
    propose = drafter.propose
    checked = []

    def checking(reqs, limits):
        out = propose(reqs, limits)
        for req, drafts in zip(reqs, out):
            if drafts:
                fill = req.fill_ids
                aux = target_aux_hidden(target, fill, [0, 1])
                assert drafts == ref.chain(aux, fill, len(drafts)), (req.rid, len(fill))
                checked.append(len(drafts))
        return out

    drafter.propose = checking
    prompts = [list(range(7, 30)), list(range(50, 61)) * 3, [3, 9, 27, 81, 243]]
    for i, ids in enumerate(prompts):
        sched.handle(greedy_req(f"d{i}", ids, 10))
    while not sched.idle:
        sched.step()
    assert len(checked) >= 3 and max(checked) == 3


def test_pending_hidden_states_replace_recompute_and_cap() -> None:
    from radixlm.runtime.speculative import eagle_hidden
    from radixlm.runtime.speculative.eagle_hidden import Pending

    def rows(start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, dtype=torch.float32)[:, None]

    p = Pending()
    p.add(0, rows(0, 10))  # a prefill
    p.add(10, rows(10, 4))  # a verify row: position 10 and three drafts
    p.add(12, rows(112, 1))  # one draft accepted: the next step starts at 12, replacing 12 and 13
    assert p.take(-1, 13) is None  # 13 is gone
    positions, hidden = p.take(-1, 12)
    assert positions == list(range(13)) and hidden[:, 0].tolist() == list(range(12)) + [112]
    assert p.take(11, 12)[0] == [12]  # the last position stays, to be fed again
    p.add(13, rows(13, 1))
    assert p.take(11, 13)[0] == [12, 13]
    cap = eagle_hidden.MAX_PENDING
    p.add(14, rows(14, cap + 5))  # a request that does not draft: the oldest go
    positions, hidden = p.take(-1, 13 + cap + 5)
    assert len(positions) == cap and positions[0] == 19 and hidden[0, 0] == 19


def test_plain_steps_keep_whole_steps_and_drafting_resumes_on_the_whole_history(target, heads) -> None:
    """While the payoff says k = 0 a step is the ordinary overlapped decode step: the drafter keeps
    the step's projected hidden states whole (nothing per request), and when drafting resumes every
    chain still equals the reference head run on the whole verified history."""
    embed = target_embedding(target)
    ref = ReferenceHead(heads["reduced"], embed)
    sched = make_scheduler(target, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(heads["reduced"]),
                           speculative_num_steps=3, disable_radix_cache=True, enable_overlap_schedule_on_cpu=True)
    sched.spec.beta = 0.005  # price drafts as on a GPU: full-depth chains
    spec, drafter = sched.spec, sched.spec.eagle
    plain_steps = 6
    steps = []

    def begin_step(now: float, generated: int, running: int) -> None:  # the payoff's choice, fixed
        spec.step_k = 0 if len(steps) < plain_steps else 3
        spec.allowed = spec.step_k > 0

    spec.begin_step = begin_step
    propose = drafter.propose
    checked = []

    def checking(reqs, limits):
        out = propose(reqs, limits)
        for req, drafts in zip(reqs, out):
            if drafts:
                fill = req.fill_ids
                assert drafts == ref.chain(target_aux_hidden(target, fill, [0, 1]), fill, len(drafts))
                checked.append(len(drafts))
        return out

    drafter.propose = checking
    prompts = [list(range(7, 30)), list(range(50, 61)) * 3]
    for i, ids in enumerate(prompts):
        sched.handle(greedy_req(f"p{i}", ids, 16))
    outs: dict[str, list[int]] = {}
    while not sched.idle:
        logged = len(drafter.log.steps)
        sched.step()
        steps.append(sched.uncommitted is not None)
        if len(steps) <= plain_steps:  # prefill, then overlapped plain decode steps
            assert not drafter.pending and not checked and len(drafter.log.steps) == logged + 1
        for o in sched.pop_outputs():
            outs[o.rid] = outs.get(o.rid, []) + o.output_ids
    assert all(steps[1:plain_steps]) and not steps[plain_steps], steps  # overlapped while k = 0
    assert len(checked) >= 3 and max(checked) == 3 and not drafter.log.steps and not drafter.pending
    off = make_scheduler(target, disable_radix_cache=True)
    for i, ids in enumerate(prompts):
        off.handle(greedy_req(f"p{i}", ids, 16))
    ref_outs: dict[str, list[int]] = {}
    while not off.idle:
        off.step()
        for o in off.pop_outputs():
            ref_outs[o.rid] = ref_outs.get(o.rid, []) + o.output_ids
    assert outs == ref_outs
