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


def _guess_pick_inputs(batch: ScheduledBatch, guess_idx: list[int], at: list[int]) -> list[torch.Tensor]:
    """The guess rows' inputs of the pick on the device: every (pair, token of its run) of the step's guess rows,
    laid end to end (`GuessRuns.entries`, made once per state's runs and width): its place in the step (guess
    row i's tokens from `at[k]` on), the pending step's row whose sampled token it compares with, the pair's key
    and the run's token. The device adds each entry's token where its key equals that sampled token: at most
    one pair of a row matches, so a place receives the matched run's token, or stays 0 (four operations on the
    device, whatever the rows)."""
    guesses, widths = batch.guesses, batch.guess_widths
    assert guesses is not None
    parts = [guesses[i].entries(widths[i]) for i in guess_idx]  # type: ignore[union-attr]
    entries = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # key, token, place: [3, E]
    # per entry: its place in the step (the guess row's first token's row + its place), its pending step's row
    where = np.repeat(np.array([at, [batch.reqs[i].uncommitted_row for i in guess_idx]], dtype=np.int64),
                      [p.shape[1] for p in parts], axis=1)
    where[0] += entries[2]
    return [torch.from_numpy(where[0]), torch.from_numpy(where[1]), torch.from_numpy(entries[0]),
            torch.from_numpy(entries[1])]


def decode_rows_forward_batch(batch: ScheduledBatch, device: torch.device, uncommitted: UncommittedStep | None,
                              cascade: CascadePlanner | None) -> tuple[ForwardBatch, SlotWrites]:
    """`ScheduledBatch.to_forward_batch` of a decode step (no drafts) where some rows compute more than
    their last token: forced tokens riding after it, a guess, or (after a synchronous commit) a ride
    appended already. Each token is one decode row of its request whose KV ends at it (rows are independent:
    their order is free). The first rows are the plain step's, one a request (its next token); the extra
    tokens follow them, request by request, so the per-request lists are the plain builder's comprehensions
    and only the few multi-token rows are visited. A request's logits row is its last token's (a guess row's:
    its own token's, then each guess token's, after every request's)."""
    reqs, prefix, ext = batch.reqs, batch.prefix_lens, batch.extend_lens
    n = len(reqs)
    on_device = [r.tokens_on_device for r in reqs]
    ids = [0 if d else r.fill_slice(p, p + 1)[0] for r, p, d in zip(reqs, prefix, on_device)]
    rows_cpu = [r.req_pool_idx for r in reqs]
    positions = list(prefix)
    guesses = batch.guesses
    batch.guess_rows, batch.guess_slots = [-1] * n, [-1] * n
    batch.sample_rows = list(range(n))
    logits = list(range(n))
    slot_of = list(range(n))  # each row's index among the step's new slots (those are request by request)
    guess_idx: list[int] = []
    guess_at: list[int] = []
    slot = 0
    for i, e in enumerate(ext):
        if e == 1:
            slot_of[i] = slot
            slot += 1
            continue
        r, p = reqs[i], prefix[i]
        slot_of[i] = slot
        k = len(ids)  # the row of its second token
        slot_of += range(slot + 1, slot + e)
        positions += range(p + 1, p + e)
        rows_cpu += [r.req_pool_idx] * (e - 1)  # type: ignore[list-item]
        if guesses is not None and guesses[i] is not None:  # its token on the device, then the run it names
            guess_idx.append(i)
            guess_at.append(k)
            batch.guess_slots[i] = slot + 1
            ids += [0] * (e - 1)
        else:
            if on_device[i]:  # its token on the device, then the forced tokens riding after it
                assert uncommitted is not None
                ids += uncommitted.ride_of(r)
            else:  # tokens appended already (a ride committed before this step was scheduled)
                ids += r.fill_slice(p + 1, p + e)
            logits[i] = k + e - 2  # (sampled after its last token)
        slot += e
    total = len(ids)
    batch.guess_index = guess_idx
    for i, k in zip(guess_idx, guess_at):  # a guess row's logits: after each of its tokens, after every request's
        batch.guess_rows[i] = len(logits)
        logits += range(k, k + ext[i] - 1)
    batch.logprob_rows = batch.verify_rows = [[] for _ in range(n)]
    batch.logprob_first_pos = [0] * n
    pending = [i for i, d in enumerate(on_device) if d]
    src = [reqs[i].uncommitted_row for i in pending]
    if pending:
        assert uncommitted is not None
    seq_lens = [p + 1 for p in positions]
    layout = None
    if cascade is not None:
        nodes = [r.last_node for r in reqs] + [reqs[i].last_node for i, e in enumerate(ext) for _ in range(e - 1)]
        layout = cascade.plan(nodes, rows_cpu, seq_lens)  # type: ignore[arg-type]
    extra = [t.to(torch.int64).view(-1) for t in layout.tensors()] if layout is not None else []
    guess_t = _guess_pick_inputs(batch, guess_idx, guess_at) if guess_idx else []
    slots = torch.cat(batch.new_slots).to(torch.int64) if len(batch.new_slots) != 1 else batch.new_slots[0].to(torch.int64)
    slots = slots[torch.tensor(slot_of, dtype=torch.int64)]  # (row order)
    slots32 = slots.to(torch.int32)
    rows_t, positions_cpu = torch.tensor(rows_cpu, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64)
    index = torch.arange(total, dtype=torch.int32)
    # every row's token on the device in the pending step's order: that step's output is the first rows as it is
    whole = len(pending) == n == uncommitted.next_ids.shape[0] and src == list(range(n)) if pending else False
    (input_ids_t, positions_t, out_cache_loc, token_rows_t, logits_t, pending_t, src_t, *rest,
     seq_lens_t, ext_t, starts_t, slots32_t) = pack_on([
        torch.tensor(ids, dtype=torch.int64), positions_cpu, slots, rows_t, torch.tensor(logits, dtype=torch.int64),
        torch.tensor([] if whole else pending, dtype=torch.int64), torch.tensor([] if whole else src, dtype=torch.int64),
        *extra, *guess_t,
    ], device, int32=[(positions_cpu + 1).to(torch.int32), torch.ones(total, dtype=torch.int32), index, slots32])
    layout_t = rest[: len(extra)]
    if whole:
        input_ids_t[:n] = uncommitted.next_ids  # type: ignore[union-attr]
    elif pending:
        input_ids_t[pending_t] = uncommitted.next_ids[src_t]  # type: ignore[union-attr]
    if guess_idx:  # each guess row's tokens: the run of the pair its first token matches (else 0s)
        dst_t, gsrc_t, keys_t, values_t = rest[len(extra):]
        hit = keys_t == uncommitted.next_ids[gsrc_t]  # type: ignore[union-attr]
        input_ids_t.index_put_((dst_t,), values_t * hit, accumulate=True)
    writes = SlotWrites(decode=True, rows=rows_t, positions=positions_cpu, prefix_lens=prefix, extend_lens=ext,
                        slots=slots32, device_token_rows=token_rows_t, device_positions=positions_t,
                        device_slots=slots32_t)
    lora = None
    if any(r.lora_name for r in reqs):
        lora = [r.lora_name for r in reqs] + [reqs[i].lora_name for i, e in enumerate(ext) for _ in range(e - 1)]
    fb = ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=input_ids_t, positions=positions_t, out_cache_loc=out_cache_loc,
        req_pool_indices=token_rows_t, seq_lens=seq_lens_t, req_pool_indices_cpu=rows_cpu,
        seq_lens_cpu=seq_lens, extend_seq_lens_cpu=[1] * total, extend_seq_lens=ext_t, extend_start_loc=starts_t,
        logits_indices=logits_t, lora_names=lora,
        cascade=layout.with_tensors(layout_t) if layout is not None else None,
    )
    return fb, writes
