"""Turns the scheduler's choice of requests into the ForwardBatch tensors of one step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from radixlm.constrained.forced_tokens import GuessRuns
from radixlm.runtime.cascade import CascadePlanner
from radixlm.runtime.device_transfer import pack_on
from radixlm.runtime.forced_rows_batch import decode_rows_forward_batch
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import SlotWrites
from radixlm.runtime.request import Req
from radixlm.runtime.speculative.draft_tree import DraftTree, TreeRows
from radixlm.runtime.uncommitted_step import UncommittedStep

if TYPE_CHECKING:
    from radixlm.runtime.forced_rows import Guess


@dataclass
class ScheduledBatch:
    mode: ForwardMode
    reqs: list[Req]
    extend_lens: list[int]  # new tokens per request this step
    prefix_lens: list[int]  # KV already present per request before this step
    new_slots: list[torch.Tensor] = field(default_factory=list)  # host slots of the new tokens, in request order
    # Per request: True for a running request taking its next decode token (in an EXTEND batch
    # when decode rows ride along with a prefill: a mixed batch), False for a prefill/extension.
    decoding: list[bool] = field(default_factory=list)
    # Per request: rows of the logits matrix holding its input-logprob positions, and the row to
    # sample from (None while a chunked prefill is unfinished or for prefill-only requests).
    logprob_rows: list[list[int]] = field(default_factory=list)
    sample_rows: list[int | None] = field(default_factory=list)
    logprob_first_pos: list[int] = field(default_factory=list)  # prompt position of the first logprob row + 1
    # Verify rows (speculative decoding; reusable for any tokens a running request proposes): per
    # request the tokens it computes after its last one (empty: none), the grammar masks of its
    # positions (constrained rows), and the logits rows of all its 1 + len(drafts) positions.
    drafts: list[list[int]] = field(default_factory=list)
    draft_masks: list[torch.Tensor | None] = field(default_factory=list)
    verify_rows: list[list[int]] = field(default_factory=list)
    # Draft trees (speculative/draft_tree.py): per request None (a chain) or each draft's parent
    # node, and the scratch request rows of its lanes after the first (decode batches only).
    draft_parents: list[list[int] | None] = field(default_factory=list)
    draft_lanes: list[list[int]] = field(default_factory=list)
    # A verify batch built ahead of the previous step's results (speculative/verify_ahead.py): per
    # request the token its row starts with, not yet on the host (the previous step's bonus, guessed).
    ahead_tokens: list[int] | None = None
    # Grammar-forced guesses (runtime/forced_rows.py), None where no row has one: per request the runs
    # (token it may be sampled -> the forced tokens after it: constrained/forced_tokens.GuessRuns) for its
    # token still on the device; such a row computes `guess_widths[i]` more tokens, the run picked on the
    # device; `guess_rows` (set with the tensors): per request its first guess token's logits row (the
    # others follow it), and `guess_slots`: that token's index among the step's new slots.
    guesses: list[GuessRuns | None] | None = None
    guess_widths: list[int] = field(default_factory=list)
    guess_states: list[int] = field(default_factory=list)  # the grammar state each guess was made at (-1: none)
    guess_rows: list[int] = field(default_factory=list)
    guess_slots: list[int] = field(default_factory=list)
    guess_index: list[int] = field(default_factory=list)  # (set with the tensors) the requests that guess
    # candidates of a guess left out (forced_rows.GuessCandidates): what their tokens would have taken counts too
    guess_seen: Any = None

    def __post_init__(self) -> None:
        # A batch built with its requests (not through add / set_decode_rows) has no drafts: every
        # per-request list that to_forward_batch zips over must still have one entry per request.
        if self.reqs and not self.drafts:
            self.drafts = [[] for _ in self.reqs]
            self.draft_masks = [None] * len(self.reqs)
        if len(self.draft_parents) < len(self.reqs):
            self.draft_parents = [None] * len(self.reqs)
            self.draft_lanes = [[] for _ in self.reqs]

    @property
    def has_drafts(self) -> bool:
        return any(self.drafts)

    def draft_tree(self, i: int) -> DraftTree:
        """Request i's drafts as a tree (a chain unless the step drafted a tree for it)."""
        parents = self.draft_parents[i]
        return DraftTree.chain(self.drafts[i]) if parents is None else DraftTree(self.drafts[i], parents)

    def add(self, req: Req, slots: torch.Tensor, decoding: bool = False, prefix_len: int | None = None) -> None:
        """`req` computes len(slots) more tokens this step, on top of the KV it holds (`prefix_len`,
        by default its kv_len)."""
        self.new_slots.append(slots)
        self.reqs.append(req)
        self.prefix_lens.append(req.kv_len if prefix_len is None else prefix_len)
        self.extend_lens.append(int(slots.numel()))
        self.decoding.append(decoding)
        self.drafts.append([])
        self.draft_masks.append(None)
        self.draft_parents.append(None)
        self.draft_lanes.append([])

    def set_decode_rows(self, reqs: list[Req], slots: torch.Tensor, drafts: list[list[int]],
                        masks: list[torch.Tensor | None], parents: list[list[int] | None] | None = None,
                        lanes: list[list[int]] | None = None, own: list[int] | None = None) -> None:
        """A decode batch in one allocation: each request computes its last token plus its drafts
        (one slot each, in request order); a request with drafts is a verify row, a chain unless
        `parents` makes it a tree (whose extra lanes are `lanes`)."""
        self.draft_parents = parents if parents is not None else [None] * len(reqs)
        self.draft_lanes = lanes if lanes is not None else [[] for _ in reqs]
        self.new_slots.append(slots)
        self.reqs = reqs
        self.prefix_lens = [r.kv_len for r in reqs]
        # `own`: each row's own pending tokens where they may be more than its last one (grammar-forced tokens
        # riding after it: runtime/forced_rows.py); by default one
        self.extend_lens = ([1 + len(d) for d in drafts] if own is None
                            else [n + len(d) for n, d in zip(own, drafts)])
        self.decoding = [True] * len(reqs)
        self.drafts = drafts
        self.draft_masks = masks

    def set_guesses(self, guesses: list[Guess | None]) -> None:
        """The decode rows' guesses (forced_rows.plan_guesses, None where a row has none): a guessing row computes
        its guess's width more tokens."""
        self.guesses = [g.runs if g is not None else None for g in guesses]
        self.guess_widths = [g.width if g is not None else 0 for g in guesses]
        self.guess_states = [g.state if g is not None else -1 for g in guesses]
        self.extend_lens = [e + w for e, w in zip(self.extend_lens, self.guess_widths)]

    def absorb(self, decode: "ScheduledBatch") -> None:
        """Fold a decode batch into this prefill batch: one forward pass instead of two."""
        self.reqs += decode.reqs
        self.extend_lens += decode.extend_lens
        self.prefix_lens += decode.prefix_lens
        self.new_slots += decode.new_slots
        self.decoding += decode.decoding
        self.drafts += decode.drafts
        self.draft_masks += decode.draft_masks
        # draft trees of the decode rows (their verify rows become extend rows with a tree mask: no lanes)
        self.draft_parents += decode.draft_parents
        self.draft_lanes += [[] for _ in decode.reqs]

    def _lora_names(self, rows: int) -> list[str | None] | None:
        """Each attention row's adapter: per request, or per token when verify rows expanded a
        decode batch into one row per token."""
        if not any(r.lora_name for r in self.reqs):
            return None
        if rows == len(self.reqs):
            return [r.lora_name for r in self.reqs]
        return [r.lora_name for r, ext in zip(self.reqs, self.extend_lens) for _ in range(ext)]

    def to_forward_batch(self, device: torch.device, uncommitted: UncommittedStep | None = None,
                         cascade: CascadePlanner | None = None, as_decode: bool = False) -> tuple[ForwardBatch, SlotWrites]:
        """The step's tensors on `device` (one packed copy), and the slot writes that the scheduler
        commits to req_to_token before running it. A decode step asks `cascade` whether its rows'
        shared radix-tree prefixes are worth attending once per group. `as_decode`: an extend batch of
        one sampled token a row, run as a decode step (runtime/prefill_as_decode.py)."""
        if as_decode:
            return self._plain_decode_forward_batch(device, uncommitted, cascade)
        if self.mode is ForwardMode.DECODE and not self.has_drafts:
            if sum(self.extend_lens) == len(self.reqs):
                return self._plain_decode_forward_batch(device, uncommitted, cascade)
            return decode_rows_forward_batch(self, device, uncommitted, cascade)  # grammar-forced rows too
        input_ids: list[int] = []
        positions: list[int] = []
        logits_indices: list[int] = []
        self.logprob_rows, self.sample_rows, self.logprob_first_pos, self.verify_rows = [], [], [], []
        offset = 0
        token_starts: list[int] = []
        token_rows_cpu: list[int] = []  # decode: each new token's request row (a tree's: its lane's)
        kv_positions: list[int] = []  # each new token's place in its row (a tree in extend: not its position)
        lane_copies: list[tuple[int, int, int]] = []
        tree_masks: list[torch.Tensor | None] = []
        decode = self.mode is ForwardMode.DECODE
        for i, (req, prefix, ext, drafts) in enumerate(zip(self.reqs, self.prefix_lens, self.extend_lens, self.drafts)):
            token_starts.append(offset)
            parents = self.draft_parents[i]
            if parents is None:
                positions.extend(range(prefix, prefix + ext))
                kv_positions.extend(range(prefix, prefix + ext))
                token_rows_cpu.extend([req.req_pool_idx] * ext)  # type: ignore[list-item]
                tree_masks.append(None)
            else:
                lay = TreeRows.lay_out(DraftTree(drafts, parents), prefix, req.req_pool_idx,  # type: ignore[arg-type]
                                       self.draft_lanes[i], decode)
                positions.extend(lay.positions)
                kv_positions.extend(lay.kv_positions)
                token_rows_cpu.extend(lay.rows)
                lane_copies.extend(lay.lane_copies)
                tree_masks.append(lay.mask)
            if drafts and self.ahead_tokens is not None:  # built ahead: its first token is not appended yet
                input_ids.append(self.ahead_tokens[i])
                input_ids.extend(drafts)
            elif drafts:  # a verify row: its last token, then the drafts; logits at every position
                assert not req.tokens_on_device and prefix + 1 == req.fill_len
                input_ids.extend(req.fill_slice(prefix, prefix + 1) + drafts)
            if drafts:
                self.verify_rows.append(list(range(len(logits_indices), len(logits_indices) + ext)))
                logits_indices.extend(range(offset, offset + ext))
                self.logprob_rows.append([])
                self.sample_rows.append(None)
                self.logprob_first_pos.append(0)
                offset += ext
                continue
            self.verify_rows.append([])
            if req.tokens_on_device:  # decode input is the token still on the device: filled in below
                input_ids.append(0)
                if ext > 1:  # ... then the grammar-forced tokens riding after it, known on the host
                    assert uncommitted is not None
                    input_ids.extend(uncommitted.ride_of(req))
            else:
                input_ids.extend(req.fill_slice(prefix, prefix + ext))
            rows: list[int] = []
            first_pos = 0
            if self.mode is ForwardMode.EXTEND and req.wants_input_logprobs:
                lo, hi = req.input_logprob_range(prefix, prefix + ext)
                rows = [len(logits_indices) + i for i in range(max(hi - lo, 0))]
                logits_indices.extend(offset + (p - prefix) for p in range(lo, hi))
                first_pos = lo + 1
            done = prefix + ext == req.seq_len
            sample_row: int | None = None
            if done:
                sample_row = len(logits_indices)
                logits_indices.append(offset + ext - 1)
            self.logprob_rows.append(rows)
            self.sample_rows.append(sample_row)
            self.logprob_first_pos.append(first_pos)
            offset += ext
        rows_cpu = [r.req_pool_idx for r in self.reqs]
        if decode and len(positions) > len(self.reqs):
            # Verify rows in a decode batch: every new token is one decode row of its request whose
            # KV ends at that token (causal over the drafts before it; a tree's token reads its
            # lane: the prompt and its ancestors), so the step keeps decode's kernels and CUDA graphs.
            rows_cpu = token_rows_cpu
            seq_lens, ext_lens = [p + 1 for p in positions], [1] * len(positions)
        else:
            seq_lens, ext_lens = [p + e for p, e in zip(self.prefix_lens, self.extend_lens)], list(self.extend_lens)
        starts = [0]
        for e in ext_lens[:-1]:
            starts.append(starts[-1] + e)
        pending = [i for i, r in enumerate(self.reqs) if r.tokens_on_device]
        if pending:
            assert uncommitted is not None and decode
        pending_tokens = [token_starts[i] for i in pending]

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64)

        layout = None
        if decode and cascade is not None:
            nodes = [r.last_node for r, ext in zip(self.reqs, self.extend_lens) for _ in range(ext)]
            layout = cascade.plan(nodes, rows_cpu, seq_lens)  # type: ignore[arg-type]
        extra = [t.to(torch.int64).view(-1) for t in layout.tensors()] if layout is not None else []
        # Draft trees in an extend step: their tokens' places in the rows, and their ancestor matrices.
        trees = not decode and any(m is not None for m in tree_masks)
        if trees:
            tree_start, flat, at = [], [], 0
            for m in tree_masks:
                tree_start.append(at if m is not None else -1)
                if m is not None:
                    flat.append(m.view(-1).to(torch.int64))
                    at += m.numel()
            extra += [ints(kv_positions), ints(tree_start), torch.cat(flat)]
        row_t, positions_cpu, ext_cpu = ints(rows_cpu), ints(positions), ints(ext_lens)  # type: ignore[arg-type]
        slots = torch.cat(self.new_slots).to(torch.int64)
        token_rows = row_t if decode else row_t.repeat_interleave(ext_cpu)  # each new token's request row
        slots32 = slots.to(torch.int32)
        # int32 where the consumers want it (lengths, req_to_token's slots), in the same copy: no casts on the device
        (input_ids_t, positions_t, out_cache_loc, rows_t, logits_t, pending_t, src_t, token_rows_t, *layout_t,
         seq_lens_t, ext_t, starts_t, slots32_t) = pack_on([
            ints(input_ids), positions_cpu, slots, row_t, ints(logits_indices), ints(pending_tokens),
            ints([self.reqs[i].uncommitted_row for i in pending]), token_rows, *extra,
        ], device, int32=[torch.tensor(seq_lens, dtype=torch.int32), ext_cpu.to(torch.int32),
                          torch.tensor(starts, dtype=torch.int32), slots32])
        if pending:
            input_ids_t[pending_t] = uncommitted.next_ids[src_t]
        tree_t: list[torch.Tensor | None] = [None, None, None]
        if trees:
            tree_t, layout_t = layout_t[-3:], layout_t[:-3]
            tree_t[2] = tree_t[2].to(torch.int8)
        writes = SlotWrites(decode=decode, rows=row_t, positions=positions_cpu, prefix_lens=self.prefix_lens,
                            extend_lens=self.extend_lens, slots=slots32, device_token_rows=token_rows_t,
                            device_positions=positions_t if tree_t[0] is None else tree_t[0], device_slots=slots32_t,
                            lane_copies=tuple(lane_copies))
        fb = ForwardBatch(
            mode=self.mode,
            input_ids=input_ids_t,
            positions=positions_t,
            out_cache_loc=out_cache_loc,
            req_pool_indices=rows_t,
            seq_lens=seq_lens_t,
            req_pool_indices_cpu=rows_cpu,  # type: ignore[arg-type]
            seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=ext_lens,
            extend_seq_lens=ext_t,
            extend_start_loc=starts_t,
            logits_indices=logits_t,
            lora_names=self._lora_names(len(rows_cpu)),
            cascade=layout.with_tensors(layout_t) if layout is not None else None,
            tree_start=tree_t[1],
            tree_mask=tree_t[2],
            tree_masks_cpu=tuple(tree_masks) if trees else None,
        )
        return fb, writes

    def _plain_decode_forward_batch(self, device: torch.device, uncommitted: UncommittedStep | None,
                                    cascade: CascadePlanner | None) -> tuple[ForwardBatch, SlotWrites]:
        """`to_forward_batch` of the usual step, one new token per request and no drafts: every
        per-row list is one comprehension and the index tensors are ranges (the general loop
        costs ~5 µs per row, the whole step's budget at batch 256 on the host)."""
        reqs = self.reqs
        n = len(reqs)
        prefix = self.prefix_lens
        # The row's only new token is its last one: on the device (the uncommitted step's row),
        # else fill_ids[prefix]; its logits row is the row itself, sampled (prefix + 1 == seq_len).
        on_device = [r.tokens_on_device for r in reqs]
        pending = [i for i, d in enumerate(on_device) if d]
        if pending:
            assert uncommitted is not None
        input_ids = [0 if d else r.fill_slice(p, p + 1)[0] for r, p, d in zip(reqs, prefix, on_device)]
        src = [reqs[i].uncommitted_row for i in pending]
        rows_cpu = [r.req_pool_idx for r in reqs]
        seq_lens = [p + 1 for p in prefix]
        self.sample_rows = list(range(n))
        self.logprob_rows = self.verify_rows = [[] for _ in range(n)]
        self.logprob_first_pos = [0] * n
        layout = None
        if cascade is not None:
            layout = cascade.plan([r.last_node for r in reqs], rows_cpu, seq_lens)  # type: ignore[arg-type]
        extra = [t.to(torch.int64).view(-1) for t in layout.tensors()] if layout is not None else []
        row_t = torch.tensor(rows_cpu, dtype=torch.int64)
        positions_cpu = torch.tensor(prefix, dtype=torch.int64)
        index = torch.arange(n, dtype=torch.int64)
        slots = torch.cat(self.new_slots).to(torch.int64) if len(self.new_slots) != 1 else self.new_slots[0].to(torch.int64)
        # Every row's token on the device, in the uncommitted step's order: that step's output is
        # this step's input as it is (no scatter).
        whole = len(pending) == n and uncommitted is not None and uncommitted.next_ids.shape[0] == n and src == list(range(n))
        slots32 = slots.to(torch.int32)
        # int32 where the consumers want it (lengths, req_to_token's slots): no conversion kernels a step
        (input_ids_t, positions_t, out_cache_loc, rows_t, index_t, pending_t, src_t, *layout_t,
         seq_lens_t, ext_t, index32_t, slots32_t) = pack_on([
            torch.tensor(input_ids, dtype=torch.int64), positions_cpu, slots, row_t, index,
            torch.tensor([] if whole else pending, dtype=torch.int64), torch.tensor([] if whole else src, dtype=torch.int64),
            *extra,
        ], device, int32=[(positions_cpu + 1).to(torch.int32), torch.ones(n, dtype=torch.int32), index.to(torch.int32), slots32])
        if whole:
            input_ids_t = uncommitted.next_ids  # type: ignore[union-attr]
        elif pending:
            input_ids_t[pending_t] = uncommitted.next_ids[src_t]  # type: ignore[union-attr]
        writes = SlotWrites(decode=True, rows=row_t, positions=positions_cpu, prefix_lens=prefix,
                            extend_lens=self.extend_lens, slots=slots32, device_token_rows=rows_t,
                            device_positions=positions_t, device_slots=slots32_t)
        fb = ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=input_ids_t, positions=positions_t, out_cache_loc=out_cache_loc,
            req_pool_indices=rows_t, seq_lens=seq_lens_t, req_pool_indices_cpu=rows_cpu,  # type: ignore[arg-type]
            seq_lens_cpu=seq_lens, extend_seq_lens_cpu=[1] * n, extend_seq_lens=ext_t,
            extend_start_loc=index32_t, logits_indices=index_t, lora_names=self._lora_names(n),
            cascade=layout.with_tensors(layout_t) if layout is not None else None,
        )
        return fb, writes
