"""ScheduledBatch.to_forward_batch on a plain decode batch (its per-list fast path) against the
values the step must carry, and against the general path on the same rows run as a mixed batch."""
from __future__ import annotations

import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.uncommitted_step import UncommittedStep


def _req(rid: str, prompt: list[int], out: list[int], row: int) -> Req:
    req = Req(rid=rid, input_ids=prompt, params=SamplingParams(max_new_tokens=50), seed=0)
    req.output_ids = list(out)
    req.req_pool_idx = row
    req.kv_len = len(prompt) + len(out) - 1  # the last token's KV is computed by this step
    return req


def _decode_batch(reqs: list[Req]) -> ScheduledBatch:
    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    slots = torch.arange(100, 100 + len(reqs), dtype=torch.int64)
    batch.set_decode_rows(reqs, slots, [[] for _ in reqs], [None] * len(reqs))
    return batch


def test_plain_decode_rows_carry_last_tokens_positions_and_slots() -> None:
    reqs = [_req("a", [5, 6, 7], [], 3), _req("b", [1, 2], [9, 4], 1), _req("c", [8], [3], 7)]
    fb, writes = _decode_batch(reqs).to_forward_batch(torch.device("cpu"))
    assert fb.input_ids.tolist() == [7, 4, 3]
    assert fb.positions.tolist() == [2, 3, 1]
    assert fb.seq_lens.tolist() == [3, 4, 2] and fb.seq_lens_cpu == [3, 4, 2]
    assert fb.req_pool_indices.tolist() == [3, 1, 7] and fb.req_pool_indices_cpu == [3, 1, 7]
    assert fb.out_cache_loc.tolist() == [100, 101, 102]
    assert fb.logits_indices.tolist() == [0, 1, 2] and fb.extend_start_loc.tolist() == [0, 1, 2]
    assert fb.extend_seq_lens_cpu == [1, 1, 1] and fb.extend_seq_lens.tolist() == [1, 1, 1]
    assert writes.decode and writes.rows.tolist() == [3, 1, 7] and writes.positions.tolist() == [2, 3, 1]
    assert writes.slots.dtype == torch.int32 and writes.slots.tolist() == [100, 101, 102]


def test_tokens_on_the_device_come_from_the_uncommitted_step() -> None:
    """Rows whose last token is still on the device read it from the uncommitted step's output, at
    their row there; the others from their own ids. In the same order: that output as it is."""
    a, b, c = _req("a", [5, 6, 7], [], 3), _req("b", [1, 2], [9, 4], 1), _req("c", [8], [3], 7)
    step = UncommittedStep.start([c, a], torch.tensor([41, 42]))  # c at row 0, a at row 1
    for r in (a, c):
        r.kv_len += 1
    fb, _ = _decode_batch([a, b, c]).to_forward_batch(torch.device("cpu"), step)
    assert fb.input_ids.tolist() == [42, 4, 41]
    assert fb.positions.tolist() == [3, 3, 2]
    whole = UncommittedStep.start([b], torch.tensor([77]))
    b.kv_len += 1
    fb, _ = _decode_batch([b]).to_forward_batch(torch.device("cpu"), whole)
    assert fb.input_ids.tolist() == [77] and fb.positions.tolist() == [4]


def test_fast_path_matches_the_general_path() -> None:
    """The same decode rows folded into an EXTEND batch (the general loop, as a mixed step builds
    them) give the same per-token tensors."""
    reqs = [_req("a", [5, 6, 7], [2], 3), _req("b", [1, 2], [9, 4], 1)]
    fast, _ = _decode_batch(reqs).to_forward_batch(torch.device("cpu"))
    mixed = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    mixed.absorb(_decode_batch(reqs))
    general, _ = mixed.to_forward_batch(torch.device("cpu"))
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens", "extend_seq_lens",
                 "extend_start_loc", "logits_indices"):
        assert getattr(fast, name).tolist() == getattr(general, name).tolist(), name
    assert fast.seq_lens_cpu == general.seq_lens_cpu and fast.req_pool_indices_cpu == general.req_pool_indices_cpu


def test_verify_rows_carry_int32_lengths_and_slots_from_the_one_copy() -> None:
    """A verify batch (the general path): lengths, start offsets and req_to_token's slots are int32 as
    copied (the packed transfer's int32 part), so the device runs no conversion kernels for them; a
    batch built ahead starts each row with its given token instead of the request's last one."""
    reqs = [_req("a", [5, 6, 7], [], 3), _req("b", [1, 2], [9, 4], 1)]
    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    batch.set_decode_rows(reqs, torch.arange(100, 105, dtype=torch.int64), [[11, 12], [13]], [None, None])
    fb, writes = batch.to_forward_batch(torch.device("cpu"))
    assert fb.input_ids.tolist() == [7, 11, 12, 4, 13]
    assert fb.positions.tolist() == [2, 3, 4, 3, 4] and fb.seq_lens.tolist() == [3, 4, 5, 4, 5]
    for t in (fb.seq_lens, fb.extend_seq_lens, fb.extend_start_loc, writes.device_slots, writes.slots):
        assert t.dtype == torch.int32
    assert writes.device_slots.tolist() == [100, 101, 102, 103, 104] and batch.verify_rows == [[0, 1, 2], [3, 4]]
    batch.ahead_tokens = [21, 22]
    assert batch.to_forward_batch(torch.device("cpu"))[0].input_ids.tolist() == [21, 11, 12, 22, 13]
