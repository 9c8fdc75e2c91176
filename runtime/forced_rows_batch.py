"""A decode step's inputs where rows compute more than their last token (runtime/forced_rows.py): forced
tokens riding after it, a guess's run picked on the device, or a ride appended already. Built with array
operations over the step and a loop over the multi-token rows only."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from radixlm.runtime.device_transfer import pack_on
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import SlotWrites

if TYPE_CHECKING:
    from radixlm.runtime.cascade import CascadePlanner
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.uncommitted_step import UncommittedStep


def _guess_pick_inputs(batch: ScheduledBatch, guess_idx: list[int], starts: np.ndarray) -> list[torch.Tensor]:
    """The guess rows' inputs of the pick on the device: every (pair, token of its run) of the step's guess rows,
    laid end to end (`GuessRuns.entries`, made once per state's runs and width): its place in the step, the
    pending step's row whose sampled token it compares with, the pair's key and the run's token. The device
    adds each entry's token where its key equals that sampled token: at most one pair of a row matches, so a
    place receives the matched run's token, or stays 0 (four operations on the device, whatever the rows)."""
    guesses, widths = batch.guesses, batch.guess_widths
    assert guesses is not None
    parts = [guesses[i].entries(widths[i]) for i in guess_idx]  # type: ignore[union-attr]
    sizes = [len(p[0]) for p in parts]
    keys, values, rank = (np.concatenate([p[k] for p in parts]) for k in range(3))
    src = np.repeat(np.fromiter((batch.reqs[i].uncommitted_row for i in guess_idx), dtype=np.int64,
                                count=len(guess_idx)), sizes)
    dst = np.repeat(starts[guess_idx] + 1, sizes) + rank
    return [torch.from_numpy(dst), torch.from_numpy(src), torch.from_numpy(keys), torch.from_numpy(values)]


def decode_rows_forward_batch(batch: ScheduledBatch, device: torch.device, uncommitted: UncommittedStep | None,
                              cascade: CascadePlanner | None) -> tuple[ForwardBatch, SlotWrites]:
    """`ScheduledBatch.to_forward_batch` of a decode step (no drafts) where some rows compute more than
    their last token: forced tokens riding after it, a guess, or (after a synchronous commit) a ride
    appended already. Each token is one decode row of its request whose KV ends at it; a row's logits
    are its last token's (a guess row's: each of its tokens'). Built with array operations over the
    step and a loop over the multi-token rows only (the general builder's per-row loop costs ~5 µs a
    row: the whole host budget of a 256-row step)."""
    reqs, prefix, ext = batch.reqs, batch.prefix_lens, batch.extend_lens
    n = len(reqs)
    ext_np = np.asarray(ext, dtype=np.int64)
    ends = np.cumsum(ext_np)
    starts = ends - ext_np
    total = int(ends[-1])
    on_device = [r.tokens_on_device for r in reqs]
    rows_cpu = np.fromiter((r.req_pool_idx for r in reqs), dtype=np.int64, count=n)
    token_rows = np.repeat(rows_cpu, ext_np)
    positions = np.repeat(np.asarray(prefix, dtype=np.int64) - starts, ext_np) + np.arange(total, dtype=np.int64)
    ids = np.zeros(total, dtype=np.int64)
    ids[starts] = [0 if d else r.fill_slice(p, p + 1)[0] for r, p, d in zip(reqs, prefix, on_device)]
    guesses = batch.guesses
    batch.guess_rows, batch.guess_slots = [-1] * n, [-1] * n
    guess_idx: list[int] = []
    for i in np.flatnonzero(ext_np > 1).tolist():
        r, at, e = reqs[i], int(starts[i]), ext[i]
        if guesses is not None and guesses[i] is not None:  # its token on the device, then the run it names
            guess_idx.append(i)
            batch.guess_slots[i] = at + 1
        elif on_device[i]:  # its token on the device, then the forced tokens riding after it
            assert uncommitted is not None
            ids[at + 1 : at + e] = uncommitted.ride_of(r)
        else:  # tokens appended already (a ride committed before this step was scheduled)
            ids[at + 1 : at + e] = r.fill_slice(prefix[i] + 1, prefix[i] + e)
    logits = ends - 1
    if guess_idx:  # a guess row's logits: after each of its tokens (where its run ends is known later)
        where = np.asarray(guess_idx, dtype=np.int64)
        per = np.ones(n, dtype=np.int64)
        per[where] = ext_np[where]
        first = np.cumsum(per) - per
        logits = np.repeat(ends - per, per) + np.arange(int(per.sum()), dtype=np.int64) - np.repeat(first, per)
        batch.sample_rows = first.tolist()
        for i in guess_idx:
            batch.guess_rows[i] = batch.sample_rows[i] + 1
    else:
        batch.sample_rows = list(range(n))
    batch.logprob_rows = batch.verify_rows = [[] for _ in range(n)]
    batch.logprob_first_pos = [0] * n
    pending = [i for i, d in enumerate(on_device) if d]
    if pending:
        assert uncommitted is not None
    seq_lens = (positions + 1).tolist()
    rows_list = token_rows.tolist()
    layout = None
    if cascade is not None:
        nodes = [r.last_node for r, e in zip(reqs, ext) for _ in range(e)]
        layout = cascade.plan(nodes, rows_list, seq_lens)  # type: ignore[arg-type]
    extra = [t.to(torch.int64).view(-1) for t in layout.tensors()] if layout is not None else []
    guess_t = _guess_pick_inputs(batch, guess_idx, starts) if guess_idx else []
    slots = torch.cat(batch.new_slots).to(torch.int64) if len(batch.new_slots) != 1 else batch.new_slots[0].to(torch.int64)
    slots32 = slots.to(torch.int32)
    rows_t, positions_cpu = torch.from_numpy(token_rows), torch.from_numpy(positions)
    index = torch.arange(total, dtype=torch.int64)
    (input_ids_t, positions_t, out_cache_loc, token_rows_t, logits_t, pending_t, src_t, *rest,
     seq_lens_t, ext_t, starts_t, slots32_t) = pack_on([
        torch.from_numpy(ids), positions_cpu, slots, rows_t, torch.from_numpy(logits),
        torch.from_numpy(starts[pending]), torch.tensor([reqs[i].uncommitted_row for i in pending], dtype=torch.int64),
        *extra, *guess_t,
    ], device, int32=[(positions_cpu + 1).to(torch.int32), torch.ones(total, dtype=torch.int32),
                      index.to(torch.int32), slots32])
    layout_t = rest[: len(extra)]
    if pending:
        input_ids_t[pending_t] = uncommitted.next_ids[src_t]  # type: ignore[union-attr]
    if guess_idx:  # each guess row's tokens: the run of the pair its first token matches (else 0s)
        dst_t, gsrc_t, keys_t, values_t = rest[len(extra):]
        hit = keys_t == uncommitted.next_ids[gsrc_t]  # type: ignore[union-attr]
        input_ids_t.index_put_((dst_t,), values_t * hit, accumulate=True)
    writes = SlotWrites(decode=True, rows=rows_t, positions=positions_cpu, prefix_lens=prefix, extend_lens=ext,
                        slots=slots32, device_token_rows=token_rows_t, device_positions=positions_t,
                        device_slots=slots32_t)
    fb = ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=input_ids_t, positions=positions_t, out_cache_loc=out_cache_loc,
        req_pool_indices=token_rows_t, seq_lens=seq_lens_t, req_pool_indices_cpu=rows_list,
        seq_lens_cpu=seq_lens, extend_seq_lens_cpu=[1] * total, extend_seq_lens=ext_t, extend_start_loc=starts_t,
        logits_indices=logits_t, lora_names=batch._lora_names(total),
        cascade=layout.with_tensors(layout_t) if layout is not None else None,
    )
    return fb, writes
