"""NGRAM draft trees (--speculative-eagle-topk > 1): several candidates verified in one decode-shaped
pass through lanes (scratch request rows), outputs identical to speculation off (greedy and seeded),
KV exact after every step, lanes and rejected branches freed at once, the radix tree never holding
an unverified token."""
from __future__ import annotations

import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.speculative.draft_tree import DraftTree
from radixlm.runtime.speculative.ngram import NgramDrafter, build_tree
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked

TREE = dict(speculative_algorithm="NGRAM", speculative_eagle_topk=4, speculative_num_steps=4,
            speculative_num_draft_tokens=9)


def tree_scheduler(model_dir, **options):
    """A scheduler drafting trees with every proposed node granted: speed-only knobs (a GPU-like
    per-token cost, no measured turn-down), so the tests exercise trees on the CPU too."""
    sched = make_scheduler(model_dir, **options, **TREE)
    sched.spec.beta, sched.spec.payoff = 0.001, None
    return sched


def oracle_trees(sched, reference: dict[tuple[int, ...], list[int]], vocab: int) -> None:
    """Make the scheduler's NGRAM drafter propose trees whose right continuation (the spec-off output,
    known from `reference`: prompt -> output) sits on a branch, never on lane 0: a wrong two-token
    chain first, then the true tokens with a wrong sibling under the first. Verification must find
    and keep the branch, move its KV into the request's row and free the rest."""

    def propose_tree(key, prompt, output, max_depth, max_nodes, topk):
        truth = reference[tuple(prompt)][len(output) : len(output) + max_depth]
        if not truth or max_depth < 2 or max_nodes < 4:
            return DraftTree([], [])
        wrong = [(t + 1 + j) % vocab for j, t in enumerate(truth[:2])]
        if len(wrong) < 2:
            wrong.append((wrong[0] + 1) % vocab)
        tokens, parents = [wrong[0], wrong[1], truth[0]], [-1, 0, -1]
        if len(truth) > 1:
            tokens.append((truth[1] + 7) % vocab)  # a wrong sibling of the true second token
            parents.append(2)
        for j, tok in enumerate(truth[1:]):
            tokens.append(tok)
            parents.append(2 if j == 0 else len(tokens) - 2)
        return DraftTree(tokens[:max_nodes], parents[:max_nodes])

    sched.spec.drafter.propose_tree = propose_tree


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def test_tree_lanes_paths_and_acceptance() -> None:
    #      root
    #     /    \
    #    0:5   3:6
    #   /  \     \
    #  1:7  2:8   4:9
    tree = DraftTree([5, 7, 8, 6, 9], [-1, 0, 0, -1, 3])
    assert tree.depths() == [1, 2, 2, 1, 2]
    assert tree.first_chain() == [5, 7] and not tree.is_chain and DraftTree.chain([1, 2]).is_chain
    lane_of, branches = tree.lanes()
    assert lane_of == [0, 0, 1, 2, 2]
    assert branches == [(0, 1), (0, 0)]  # lane 1 shares lane 0's root + node 0; lane 2 the root only
    assert tree.path(4) == [3, 4]
    # targets: after root, after node 0..4
    assert tree.accepted_path([6, 0, 0, 0, 9, 1]) == ([6, 9, 1], [3, 4])
    assert tree.accepted_path([5, 8, 0, 2, 0, 0]) == ([5, 8, 2], [0, 2])
    assert tree.accepted_path([4, 0, 0, 0, 0, 0]) == ([4], [])
    assert tree.cut(3).parents == [-1, 0, 0]


def test_build_tree_merges_candidates_with_topk_and_node_limits() -> None:
    cands = [([1, 2, 3, 4], 8), ([1, 2, 9], 8), ([5, 6], 8), ([7], 8), ([8], 8)]
    t = build_tree(cands, depth=4, max_depth=4, max_nodes=16, topk=3)
    assert t.tokens == [1, 2, 3, 4, 9, 5, 6, 7] and t.parents == [-1, 0, 1, 2, 1, -1, 5, -1]
    assert build_tree(cands, 4, 4, 5, 3).tokens == [1, 2, 3, 4, 9]
    chain = build_tree(cands, 4, 4, 16, 1)
    assert chain.is_chain and chain.tokens == [1, 2, 3, 4]
    # short matches draft at most their length
    assert build_tree([([1, 2, 3, 4], 2)], 4, 4, 16, 2).tokens == [1, 2]


def test_ngram_tree_holds_several_continuations() -> None:
    d = NgramDrafter(occurrences=4)
    prompt = [1, 2, 3, 10, 11, 1, 2, 3, 20, 21, 1, 2, 3, 30, 31, 1, 2, 3]
    t = d.propose_tree(0, prompt, [], max_depth=2, max_nodes=8, topk=4)
    assert set(zip(t.tokens, t.parents)) >= {(30, -1), (20, -1), (10, -1)}
    assert t.tokens[0] == 30  # the most recent occurrence first (lane 0: the chain drafting would pick)


def test_greedy_identical_with_trees_in_mixed_chunked_batches(tiny) -> None:
    model_dir = tiny
    prompts = copy_prompts(model_dir, 12)
    reqs = [greedy_req(f"r{i}", ids, 24 + (i % 5) * 4) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(model_dir, chunked_prefill_size=32), reqs)
    spec = tree_scheduler(model_dir, chunked_prefill_size=32, max_running_requests=4)
    trees = []
    orig = spec.tree_kv.take_lanes

    def counting(*args, **kwargs):  # count steps that verified a tree with lanes
        out = orig(*args, **kwargs)
        trees.append(sum(len(x) for x in out))
        return out

    spec.tree_kv.take_lanes = counting  # type: ignore[method-assign]
    got = run_checked(spec, reqs)
    assert_same(got, ref)
    assert sum(trees) > 0, "no step verified a tree with more than one lane"
    assert spec.info()["spec_accepted_tokens"] > 0
    assert not spec.tree_kv.steps and spec.req_to_token_pool.available() == spec.req_to_token_pool.capacity
    assert_pool_idle(spec)


def test_seeded_sampling_stop_strings_and_logprobs_identical_with_trees(tiny) -> None:
    from transformers import AutoTokenizer

    prompts = copy_prompts(tiny, 6)
    free = run_to_completion(make_scheduler(tiny), [greedy_req("f", prompts[0], 20)])["f"]["output_ids"]
    stop = AutoTokenizer.from_pretrained(str(tiny)).decode(free[8:10])
    configs = [dict(temperature=0.0, stop=[stop]), dict(temperature=0.3, seed=5),
               dict(temperature=0.4, top_k=8, top_p=0.9, seed=6), dict(temperature=0.3, frequency_penalty=0.2, seed=7)]
    reqs = [TokenizedGenerateReq(rid=f"s{i}", input_ids=ids, return_logprob=True, top_logprobs_num=2,
                                 params=SamplingParams(max_new_tokens=26, ignore_eos=True, **configs[i % len(configs)]))
            for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    got = run_checked(tree_scheduler(tiny, max_running_requests=3), reqs)
    assert_same(got, ref)
    for rid in ref:
        a, b = got[rid]["output_token_logprobs"], ref[rid]["output_token_logprobs"]
        assert [t for _, t in a] == [t for _, t in b]
        assert all(abs(x - y) < 1e-4 for (x, _), (y, _) in zip(a, b))


def test_tree_kv_exact_under_churn_and_retraction(tiny) -> None:
    prompts = [ids[:60] for ids in copy_prompts(tiny, 14, seed=3)]
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny, max_total_tokens=8192), reqs)
    sched = tree_scheduler(tiny, max_total_tokens=420, chunked_prefill_size=64)
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sched.stats["retractions"] > 0
    assert_pool_idle(sched)


def test_trees_ride_along_prefills_as_extend_rows_with_a_tree_mask(tiny) -> None:
    """Requests arriving while others decode: the decode rows' trees go into the prefill's forward
    pass (a mixed batch) as extend rows with an ancestor mask, no lanes; outputs still identical."""
    prompts = copy_prompts(tiny, 10)
    reqs = [greedy_req(f"r{i}", ids, 30) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = tree_scheduler(tiny, chunked_prefill_size=16, max_running_requests=10)
    mixed_trees = []
    orig = sched.runner.forward

    def forward(fb):
        if fb.tree_masks_cpu is not None:
            mixed_trees.append(sum(m is not None for m in fb.tree_masks_cpu))
        return orig(fb)

    sched.runner.forward = forward  # type: ignore[method-assign]
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sum(mixed_trees) > 0, "no tree rode along a prefill"
    assert_pool_idle(sched)


def test_tree_budget_grants_branches_only_where_rows_are_cheap() -> None:
    from radixlm.runtime.speculative.draft_budget import grant, grant_tree_nodes

    tree = DraftTree([5, 7, 8, 6, 9], [-1, 0, 0, -1, 3])  # first chain 5, 7; branches 8 and 6 -> 9
    assert grant_tree_nodes([tree], [0.6], 0.005) == [5]  # a GPU at batch 1: the whole tree
    assert grant_tree_nodes([tree], [0.6], 0.2) == [2]  # the CPU: the first chain only
    many = grant_tree_nodes([tree] * 64, [0.6] * 64, 0.005)
    assert many == grant([2] * 64, [0.6] * 64, 0.005)  # batch 64: no branches beyond the chains' grant
    assert grant_tree_nodes([tree], [0.6], 0.005, limit=3) == [3]


def test_default_model_trees_with_json_schema_stop_and_4bit_rows(default_model_dir) -> None:
    """The default model (4-bit rows through the CPU one-call decode stack): constrained rows draft
    their first chain beside unconstrained trees; outputs identical, the radix tree clean."""
    import json

    from transformers import AutoTokenizer

    from tests.speculative.test_spec_scheduler import COPY_TEXTS

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False))

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    ids = chat("Alice lives in Paris. Bob lives in Berlin. Return the first person as JSON with name and city.")
    copies = [chat("Repeat exactly: " + t) for t in COPY_TEXTS]
    reqs = [
        TokenizedGenerateReq(rid="json", input_ids=ids, params=SamplingParams(
            temperature=0.0, max_new_tokens=32, json_schema=json.dumps(schema))),
        TokenizedGenerateReq(rid="stop", input_ids=copies[0], params=SamplingParams(
            temperature=0.0, max_new_tokens=32, stop=["return"])),
        *[greedy_req(f"c{i}", c, 12 + 5 * i) for i, c in enumerate(copies)],
    ]
    base = make_scheduler(default_model_dir, max_total_tokens=8192)
    spec = tree_scheduler(default_model_dir, max_total_tokens=8192)
    assert spec.spec.thresholds, "the default model's CPU linears are 4-bit"
    try:
        ref = run_to_completion(base, reqs, timeout_s=900)
        got = run_checked(spec, reqs)
    finally:
        for s in (base, spec):
            if s.grammars is not None:
                s.grammars.close()
    assert_same(got, ref)
    assert spec.info()["spec_accepted_tokens"] > 0
    assert_pool_idle(spec)


def test_abort_and_multi_turn_reuse_with_trees(tiny) -> None:
    prompts = copy_prompts(tiny, 4)
    sched = tree_scheduler(tiny)
    got = run_checked(sched, [greedy_req(f"a{i}", ids, 40) for i, ids in enumerate(prompts)], abort_after={"a1": 5})
    assert got["a1"]["finished_reason"]["type"] == "abort" and len(got["a0"]["output_ids"]) == 40
    assert_pool_idle(sched)
    cached = {}
    for name, s in (("off", make_scheduler(tiny)), ("tree", tree_scheduler(tiny))):
        first = run_to_completion(s, [greedy_req("t1", prompts[0], 30)])
        turn2 = prompts[0] + first["t1"]["output_ids"] + prompts[0][:5]
        cached[name] = run_to_completion(s, [greedy_req("t2", turn2, 5)])["t2"]["cached_tokens"]
    assert cached["tree"] == cached["off"] >= len(prompts[0]) + 29


def test_tree_flags() -> None:
    from radixlm.runtime.server_args import ServerArgs

    args = ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=4, speculative_num_steps=3)
    assert (args.speculative_topk, args.speculative_max_drafts, args.speculative_tree_nodes) == (4, 3, 12)
    args = ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=2, speculative_num_steps=5,
                      speculative_num_draft_tokens=7)  # a tree: num_draft_tokens need not be steps + 1
    assert (args.speculative_max_drafts, args.speculative_tree_nodes) == (5, 6)
    args = ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=4, speculative_num_draft_tokens=9)
    assert (args.speculative_max_drafts, args.speculative_tree_nodes) == (4, 8)  # depth stays the default
    with pytest.raises(ValueError, match="speculative_eagle_topk"):
        ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="x", speculative_eagle_topk=2)
    with pytest.raises(ValueError, match="speculative_eagle_topk"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_eagle_topk=2, tp_size=2)
    with pytest.raises(ValueError, match="speculative_num_draft_tokens"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=6)


@pytest.mark.parametrize("where", ["forward", "after_keep"])
def test_a_failing_tree_step_frees_its_lanes_and_nodes(tiny, where: str) -> None:
    """A step that fails in the forward pass (trees laid out, lanes taken) or while its results are
    applied (one tree already settled into its row) fails its requests only; every slot and request
    row is accounted for afterwards (run_checked audits after every step) and later requests run."""
    from radixlm.runtime.fault_isolation import kv_accounting_problem

    prompts = copy_prompts(tiny, 4)
    sched = tree_scheduler(tiny, max_running_requests=4)
    fired = []
    if where == "forward":
        orig = sched.runner.forward

        def forward(fb):
            if not fired and len(sched.tree_kv.steps) and any(lay for lay in sched.tree_kv.steps.values() if lay.lanes):
                fired.append(1)
                raise RuntimeError("injected forward failure")
            return orig(fb)

        sched.runner.forward = forward  # type: ignore[method-assign]
    else:
        ref = run_to_completion(make_scheduler(tiny), [greedy_req(f"f{i}", ids, 30) for i, ids in enumerate(prompts)])
        oracle_trees(sched, {tuple(p): ref[f"f{i}"]["output_ids"] for i, p in enumerate(prompts)},
                     sched.runner.vocab_size)
        keep = sched.tree_kv.keep

        def keep_then_fail(req, kept):
            keep(req, kept)
            if not fired and kept != tuple(range(len(kept))):  # settled on a branch (not nodes 0, 1, ...)
                fired.append(1)
                raise RuntimeError("injected failure after a tree settled")

        sched.tree_kv.keep = keep_then_fail  # type: ignore[method-assign]
    got = run_checked(sched, [greedy_req(f"f{i}", ids, 30) for i, ids in enumerate(prompts)])
    assert fired, "no tree step to fail"
    assert any(r["finished_reason"]["type"] == "abort" for r in got.values())
    assert kv_accounting_problem(sched) is None and not sched.tree_kv.steps
    assert_pool_idle(sched)
    after = run_to_completion(sched, [greedy_req("g", prompts[0], 20)])
    assert after["g"]["output_ids"] == run_to_completion(make_scheduler(tiny), [greedy_req("g", prompts[0], 20)])["g"]["output_ids"]


def test_branches_accepted_off_lane_zero_keep_outputs_identical(tiny) -> None:
    """Trees whose right path is always a branch (oracle_trees): every verify keeps an off-lane-0
    path, so the next steps read KV moved from a lane into the request's row; outputs identical to
    speculation off, KV exact after every step, and about a depth's worth of tokens per step."""
    prompts = copy_prompts(tiny, 6)
    reqs = [greedy_req(f"o{i}", ids, 20 + 3 * i) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = tree_scheduler(tiny, max_running_requests=3, chunked_prefill_size=32)
    oracle_trees(sched, {tuple(p): ref[f"o{i}"]["output_ids"] for i, p in enumerate(prompts)}, sched.runner.vocab_size)
    branch_keeps = []
    keep = sched.tree_kv.keep

    def counting(req, kept):
        branch_keeps.append(bool(kept) and kept[0] == 2)
        keep(req, kept)

    sched.tree_kv.keep = counting  # type: ignore[method-assign]
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sum(branch_keeps) >= 20
    assert sched.info()["avg_spec_accept_length"] > 2.5
    assert_pool_idle(sched)


def test_trees_beyond_the_free_request_rows_verify_their_first_chain() -> None:
    from radixlm.runtime.speculative.drafts import Drafts

    tree = DraftTree([5, 7, 8, 6, 9], [-1, 0, 0, -1, 3])  # two extra lanes
    drafts = Drafts([tree.tokens, [1, 2], tree.tokens], [None] * 3, [tree.parents, None, tree.parents])
    kept = drafts.within_lanes(3)
    assert kept.parents == [tree.parents, None, None] and kept.tokens[2] == [5, 7]
    assert drafts.within_lanes(1).parents is None and drafts.within_lanes(4).parents == drafts.parents
