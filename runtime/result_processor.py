"""After a forward pass: logprobs, sampling, grammar advance, stop checks, jump-forward.

Result processing is a function of (batch, logits or sampled tokens): it records each request's
new tokens and logprobs on the request and returns one `SeqEvent` per request saying what became
of it. It never touches the scheduler's queues, KV or outputs: the Scheduler applies the events.
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.request import Req
from radixlm.runtime.sampler import SampleRow, SamplingBatch, apply_logit_adjustments, greedy_argmax, sample
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.speculative.verify import position_rows
from radixlm.runtime.step_logprobs import LogprobEntry, output_logprobs, record_input_logprobs, run_logprobs
from radixlm.runtime.stop_regex import StopRegexTooSlow, compile_stop_regexes

if TYPE_CHECKING:
    from radixlm.runtime.grammar_runtime import GrammarRuntime

logger = logging.getLogger(__name__)

# Measured on an H200 (8B shape, batch 64): an eager mixed step ~15.7 ms vs a graph decode step
# ~5.5 ms, i.e. about two extra decode steps (benchmarks/profile_steps.py, item f).
JUMP_EAGER_EXTRA_STEPS = 2.0
JUMP_MAX_USEFUL_TOKENS = 64
# A row whose mask allowed no token (a dead end, e.g. uniqueItems with every allowed item used) draws a token the
# grammar refuses: the request fails with this, never ends as a normal stop with an incomplete document.
GRAMMAR_DEAD_END = ("constrained decoding reached a state where the grammar allows no token (a dead end of the "
                    "json_schema / regex / ebnf constraint); the output so far is incomplete")


class SeqEvent(NamedTuple):
    """What one step did to one request (immutable: a NamedTuple, made per row per step, costs a
    fifth of a frozen dataclass). `was_running`: it was decoding (else its prompt, or its forced
    tokens, just finished prefilling). `finished`: it ended (typed reason); `jumped`:
    grammar-forced tokens were appended and need an extend step; neither: it decodes on.
    `sampled`: tokens appended this step (0 for a prompt that asked for no tokens). A verify row
    (speculative decoding) also says how many tokens it `drafted` and `accepted`, and how many of
    the KV positions it computed hold `unverified` tokens: the scheduler frees those at once.
    `jump_due`: committed while the next step already ran (overlap), so no jump could be taken, but
    its grammar now forces a run long enough to jump: the scheduler commits before the next step."""

    req: Req
    was_running: bool
    finished: FinishReason | None = None
    jumped: bool = False
    sampled: int = 1
    drafted: int = 0
    accepted: int = 0
    unverified: int = 0
    jump_due: bool = False
    kept: tuple[int, ...] = ()  # a verify row's accepted draft nodes, in path order (trees: which ones)


class ResultProcessor:
    def __init__(self, tokenizer: Any, eos_ids: Collection[int], context_len: int,
                 jump_forward: bool, decode_graphs: bool, prompt_rows_running: bool = False) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.context_len = context_len
        self.jump_forward_enabled = jump_forward
        self.decode_graphs = decode_graphs  # decode steps replay CUDA graphs: an extend step costs more
        self.prompt_rows_running = prompt_rows_running  # (overlapped constrained prefill: see _append)

    # ---------------------------------------------------------------- results
    def process(self, batch: ScheduledBatch, logits: torch.Tensor, forks: dict[Req, list[Req]],
                grammars: GrammarRuntime | None, num_running: int, targets: list[int] | None = None) -> list[SeqEvent]:
        """A synchronous step: input logprobs, then sample every row that completed. `forks`: the
        followers (n > 1) that sample from their leader's prompt row, KV already shared. `targets`:
        the verify rows' target tokens, drawn already (`verify_targets`, a batch of verify rows only)."""
        events: list[SeqEvent] = []
        to_sample: list[tuple[Req, int, bool]] = []
        to_verify: list[int] = []
        for i, req in enumerate(batch.reqs):
            if req.finished:
                continue  # its pending token (overlap), committed after this step launched, ended it
            if batch.drafts[i]:
                to_verify.append(i)
                continue
            if batch.logprob_rows[i]:
                record_input_logprobs(req, logits, batch.logprob_rows[i], batch.logprob_first_pos[i])
            row = batch.sample_rows[i]
            if row is None:
                continue  # a chunk of a long prompt: more to prefill
            if not batch.decoding[i]:  # its prompt (or forced tokens) is now all in the KV cache
                req.input_logprobs_done = True
                if req.params.max_new_tokens == 0:
                    events.append(SeqEvent(req, False, FinishReason.of_length(0), sampled=0))
                    continue
                for follower in forks.get(req, ()):
                    follower.input_logprobs_done = True
                    follower.pending_input_logprobs = list(req.pending_input_logprobs)
                    follower.pending_input_top = list(req.pending_input_top)
                    to_sample.append((follower, row, False))
            to_sample.append((req, row, batch.decoding[i]))
        if to_sample:
            reqs = [r for r, _, _ in to_sample]
            rows = [row for _, row, _ in to_sample]
            rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
            next_ids = self.sample(reqs, rows_logits, grammars, any(r.return_logprob for r in reqs))  # (masks in place)
            lp_map = output_logprobs(reqs, rows_logits, next_ids)
            events += self._append(reqs, next_ids.tolist(), lp_map, [d for _, _, d in to_sample], grammars,
                                   num_running, allow_jump=True)
        if to_verify:
            if targets is not None and len(to_verify) < len(batch.reqs):  # (drawn for every row: keep these rows')
                at = [0]
                for d in batch.drafts:
                    at.append(at[-1] + len(d) + 1)
                targets = [t for i in to_verify for t in targets[at[i] : at[i + 1]]]
            events += self._verify(batch, to_verify, logits, grammars, num_running, targets)
        return events

    def verify_targets(self, batch: ScheduledBatch, logits: torch.Tensor) -> torch.Tensor:
        """The target's token at every verify position of a batch whose rows all verify drafts
        (unconstrained), on the device: drawn before the next step runs, which may reuse the buffers
        the logits came from (speculative/verify_ahead.py)."""
        indices = list(range(len(batch.reqs)))
        rows = [r for i in indices for r in batch.verify_rows[i]]
        rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
        return self._verify_targets(batch, indices, rows_logits, None)

    def _verify_targets(self, batch: ScheduledBatch, indices: list[int], rows_logits: torch.Tensor,
                        bitmask: torch.Tensor | None) -> torch.Tensor:
        reqs = [batch.reqs[i] for i in indices]
        if bitmask is None and all(r.params.is_greedy and not r.params.needs_output_history
                                   and len(r.output_ids) >= r.params.min_new_tokens for r in reqs):
            return greedy_argmax(rows_logits)  # what sample_rows draws for such rows, without them
        trees = [batch.draft_tree(i) for i in indices]
        shape = (rows_logits.shape[1], str(rows_logits.device))
        return self.sample_rows(position_rows(reqs, trees, self.eos_ids, shape), rows_logits, bitmask)

    def _verify(self, batch: ScheduledBatch, indices: list[int], logits: torch.Tensor,
                grammars: GrammarRuntime | None, num_running: int, drawn: list[int] | None = None) -> list[SeqEvent]:
        """Verify rows (speculative/verify.py): draw the target's token at every position (unless
        `drawn`), keep the drafts that match plus the token after them, appended one by one with
        every finish check."""
        reqs = [batch.reqs[i] for i in indices]
        trees = [batch.draft_tree(i) for i in indices]
        rows = [r for i in indices for r in batch.verify_rows[i]]
        rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]  # (batch 1: every row)
        bitmask = None
        if any(r.grammar is not None for r in reqs):
            width = next(m.shape[1] for m in (batch.draft_masks[i] for i in indices) if m is not None)
            bitmask = torch.cat([batch.draft_masks[i] if batch.draft_masks[i] is not None
                                 else torch.full((len(batch.drafts[i]) + 1, width), -1, dtype=torch.int32)
                                 for i in indices])
        targets = drawn if drawn is not None else self._verify_targets(batch, indices, rows_logits, bitmask).tolist()
        want_lp = any(r.return_logprob for r in reqs)
        events = []
        start = 0
        for req, tree in zip(reqs, trees):
            n = len(tree) + 1
            run, kept = tree.accepted_path(targets[start : start + n])
            matched = len(kept)
            # the logits rows of the emitted tokens: the root's, then each kept node's
            path_rows = [start] + [start + 1 + node for node in kept]
            lp_entries = (run_logprobs(req, rows_logits[path_rows[: len(run)]], run)
                          if want_lp and req.return_logprob else None)
            start += n
            reason = None
            for j, tok in enumerate(run):
                if req.grammar is not None:
                    assert grammars is not None
                    grammars.advance_one(req, tok)
                req.output_ids.append(tok)
                if lp_entries is not None:
                    req.pending_output_logprobs.append((lp_entries[j][0], tok))
                    if req.top_logprobs_num > 0:
                        req.pending_output_top.append(lp_entries[j][1] or [])
                reason = self.check_finish(req, tok, grammars)
                if reason is not None:
                    run = run[: j + 1]
                    break
            # Drafts accepted and kept (a finish may cut the run). KV was computed for the last token
            # and every draft; it stays valid up to the last kept draft.
            accepted = min(matched, len(run))
            req.spec_verify_ct += 1
            req.spec_accepted_tokens += accepted
            unverified = len(tree) - accepted
            jumped = reason is None and self._jump_forward(req, grammars, num_running)
            if reason is not None or jumped:
                num_running -= 1
            events.append(SeqEvent(req, True, reason, jumped, sampled=len(run), drafted=len(tree),
                                   accepted=accepted, unverified=unverified, kept=tuple(kept[:accepted])))
        return events

    def commit(self, reqs: list[Req], ids: list[int], grammars: GrammarRuntime | None, num_running: int,
               allow_jump: bool = True, advanced: set[int] | None = None,
               rides: list[list[int]] | None = None) -> list[SeqEvent]:
        """The tokens of an uncommitted step (overlap), sampled on the device a step ago. `allow_jump=False`
        while a step that consumes them is launched; `advanced`: `advance_grammars`' result (the grammars took
        them already). `rides`: per row the grammar-forced tokens appended after its token (forced_rows.py)."""
        return self._append(reqs, ids, {}, [True] * len(reqs), grammars, num_running, allow_jump, advanced, rides)

    def advance_grammars(self, reqs: list[Req], ids: list[int], grammars: GrammarRuntime | None, num_running: int,
                         allow_jump: bool, rides: list[list[int]] | None = None) -> set[int]:
        """Commit each constrained row's token (and its riding forced tokens) to its matcher, all at once; the ids
        of rows whose grammar now forces a run worth a jump (see `_append`)."""
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if not constrained:
            return set()
        assert grammars is not None
        if len(constrained) < len(reqs):  # (item (f): every row constrained, the lists as they are)
            reqs, ids = [reqs[i] for i in constrained], [ids[i] for i in constrained]
            rides = None if rides is None else [rides[i] for i in constrained]
        return grammars.advance_many(reqs, ids, 0 if allow_jump else self.jump_check_tokens(num_running), rides)

    def sample(self, reqs: list[Req], rows_logits: torch.Tensor, grammars: GrammarRuntime | None,
               logits_needed_after: bool = True, prepared: SamplingBatch | None = None) -> torch.Tensor:
        """Next token per row, on the device. `logits_needed_after=False` (an overlapped step) masks
        `rows_logits` in place, without a [B, V] copy. `prepared`: these rows' `prepare_sampling`."""
        if prepared is None:
            prepared = self.prepare_sampling(reqs, rows_logits.shape[1], rows_logits.device)
        if prepared is None:
            return greedy_argmax(rows_logits)  # the common greedy case: no per-row tensors to build
        constrained = grammars is not None and any(r.grammar is not None for r in reqs)
        bitmask = grammars.bitmask(reqs, rows_logits.device) if constrained else None  # type: ignore[union-attr]
        return self.sample_rows(prepared.rows, rows_logits, bitmask, logits_needed_after, prepared)

    def prepare_sampling(self, reqs: list[Req], vocab: int, device: torch.device) -> SamplingBatch | None:
        """What a draw reads but the masks: each row's sampling values (on the device) and bans; None for a
        plain argmax. Nothing here reads the tokens still on the device (a row's step counts them): an
        overlapped constrained step builds it before it waits for them (step_order.SAMPLING_BEFORE_TOKENS)."""
        banned: list[tuple[int, ...]] = []
        needs_adjust = constrained = False
        greedy = True
        for r in reqs:  # one pass: what the batch needs
            p = r.params
            b = tuple(self.eos_ids | p.stop_token_set) if len(r.output_ids) < p.min_new_tokens else ()
            banned.append(b)
            needs_adjust = needs_adjust or bool(b) or p.has_penalties or bool(p.logit_bias)
            constrained = constrained or r.grammar is not None
            greedy = greedy and p.is_greedy
        if not needs_adjust and not constrained and greedy:
            return None
        rows = [SampleRow(r.params, r.seed, len(r.output_ids) + r.tokens_on_device, r.output_ids, r.input_ids, b,
                          r.prompt_mask(vocab, device)) for r, b in zip(reqs, banned)]
        return SamplingBatch.build(rows, vocab, device)

    @staticmethod
    def sample_rows(rows: list[SampleRow], rows_logits: torch.Tensor, bitmask: torch.Tensor | None,
                    logits_needed_after: bool = True, sbatch: SamplingBatch | None = None) -> torch.Tensor:
        """One token per row: adjustments (penalties, bias, bans), the bitmask, the seeded draw; `sbatch`: built."""
        needs_adjust = any(r.params.needs_output_history or r.banned_ids for r in rows)
        all_greedy = sbatch.all_greedy if sbatch is not None else all(r.params.is_greedy for r in rows)
        if not needs_adjust and bitmask is None and all_greedy:
            return greedy_argmax(rows_logits)
        if sbatch is None:
            sbatch = SamplingBatch.build(rows, rows_logits.shape[1], rows_logits.device)
        adjusted = apply_logit_adjustments(rows_logits.clone(), sbatch) if needs_adjust else rows_logits
        if bitmask is not None:
            from radixlm.constrained import apply_token_bitmask_

            if adjusted is rows_logits and logits_needed_after:
                adjusted = rows_logits.clone()
            # (logits made under inference mode may only be written in place under it)
            with torch.inference_mode(adjusted.is_inference()):
                apply_token_bitmask_(adjusted, bitmask.to(adjusted.device, non_blocking=True))
        return sample(adjusted, sbatch)

    def _append(self, reqs: list[Req], ids: list[int], lp_map: dict[int, LogprobEntry], decoding: list[bool],
                grammars: GrammarRuntime | None, num_running: int, allow_jump: bool,
                advanced: set[int] | None = None, rides: list[list[int]] | None = None) -> list[SeqEvent]:
        """Append sampled tokens on the host, then check for a finish or a jump forward. `num_running` is
        followed through the rows as the scheduler will apply their events (a jump's worth depends on it;
        with `prompt_rows_running` rows whose prompt just completed count from the start, as
        constrained_prefill_overlaps reads it). `rides`: per row the forced tokens after its token."""
        events = []
        if self.prompt_rows_running:
            num_running += decoding.count(False)
        due = (self.advance_grammars(reqs, ids, grammars, num_running, allow_jump, rides) if advanced is None
               else advanced)
        for i, (req, tok, was_running) in enumerate(zip(reqs, ids, decoding)):
            out = req.output_ids
            out.append(tok)
            if lp_map and i in lp_map:
                lp, top = lp_map[i]
                req.pending_output_logprobs.append((lp, tok))
                if req.top_logprobs_num > 0:
                    req.pending_output_top.append(top or [])
            ride = rides[i] if rides is not None else None
            # (a row's grammar answers for the end of its ride: the tokens before its last cannot end it)
            reason = self.check_finish(req, tok, None if ride else grammars)
            sampled = unverified = 0
            if ride:
                sampled, unverified = self._append_ride(req, ride, reason)
                if reason is None and sampled:
                    reason = self.check_finish(req, out[-1], grammars)
            jumped = (reason is None and allow_jump and req.grammar is not None
                      and self._jump_forward(req, grammars, num_running))
            if was_running and (reason is not None or jumped):
                num_running -= 1
            elif not was_running and reason is None and not jumped and not self.prompt_rows_running:
                num_running += 1
            events.append(SeqEvent(req, was_running, reason, jumped, sampled=1 + sampled, unverified=unverified,
                                   jump_due=bool(due) and reason is None and id(req) in due and not req.return_logprob))
        return events

    def _append_ride(self, req: Req, ride: list[int], reason: FinishReason | None) -> tuple[int, int]:
        """Append a row's riding forced tokens after its sampled one (which ended it already: `reason`);
        (tokens appended, tokens whose KV a launched step computes but that were not appended). A ride
        never crosses a finish by construction (forced_rows.py): only its last token may end the grammar
        (checked by the caller, the matcher having taken the whole ride); the other checks stay, cutting
        the ride."""
        if reason is not None:
            return 0, len(ride)
        out = req.output_ids
        for j, tok in enumerate(ride[:-1]):
            out.append(tok)
            if self.check_finish(req, tok, None) is not None:
                return j + 1, len(ride) - j - 1
        out.append(ride[-1])
        return len(ride), 0

    def jump_check_tokens(self, num_running: int) -> int:
        """The forced run (tokens) from which a row's jump would pay at this batch size, or 0 when none
        would (no per-row check: large GPU batches; an overlapped commit, a constrained prefill overlapped)."""
        if not self.jump_forward_enabled:
            return 0
        min_tokens = self.jump_min_tokens(num_running)
        return min_tokens if min_tokens <= JUMP_MAX_USEFUL_TOKENS else 0

    # ---------------------------------------------------------------- overlap
    def can_defer(self, batch: ScheduledBatch) -> bool:
        """Whether this decode batch can be sampled on the device and committed a step later:
        nothing in its sampling may depend on host state that the uncommitted step would change."""
        if batch.mode is not ForwardMode.DECODE or batch.has_drafts:
            return False  # verify rows need their drafts' outcome on the host before the next step
        # Constrained rows too: their step-k tokens are committed (matchers advanced) while step
        # k+1's forward runs, then their masks are applied before sampling. A jump cannot be taken
        # in such a commit (it would rewrite tokens the running step consumes); a row whose grammar
        # forces a run worth jumping is flagged (`SeqEvent.jump_due`) and the scheduler commits
        # before the next step, where the jump is taken. Overlap is kept on every other step (real
        # schemas' forced runs are short: benchmarks/RESULTS.md, "Constrained rows overlapped at every batch size").
        for r in batch.reqs:  # a plain loop: this runs over every row of every decode step
            p = r.params
            if r.return_logprob or p.needs_output_history or len(r.output_ids) + r.tokens_on_device < p.min_new_tokens:
                return False
        return True

    # ---------------------------------------------------------------- grammar-forced tokens
    def _jump_forward(self, req: Req, grammars: GrammarRuntime | None, num_running: int) -> bool:
        """Grammar-forced text is appended without decode steps (not with logprobs: they would have holes)."""
        if req.grammar is None or req.return_logprob or not self.jump_forward_enabled:
            return False
        min_tokens = self.jump_min_tokens(num_running)
        if min_tokens > JUMP_MAX_USEFUL_TOKENS:
            return False  # forced runs that long are rare: not worth computing the forced prefix
        assert grammars is not None
        return grammars.jump_forward(req, allow_retokenize=True, min_tokens=min_tokens) > 0

    def jump_min_tokens(self, num_running: int) -> int:
        """The shortest forced run worth a jump. Its forced tokens need an extend step, which takes
        the whole batch off the CUDA-graph decode path for one eager (mixed) forward pass, costing
        about JUMP_EAGER_EXTRA_STEPS decode steps for every running row; decoding the run instead
        costs this row one step per token (the mask leaves one choice) and the others nothing. On
        the CPU (no graphs) an extension costs what a decode step costs: every jump pays."""
        if not self.decode_graphs:
            return 1
        return 1 + int(JUMP_EAGER_EXTRA_STEPS * num_running)

    # ---------------------------------------------------------------- stops
    def check_finish(self, req: Req, tok: int, grammars: GrammarRuntime | None) -> FinishReason | None:
        p = req.params
        out = req.output_ids
        if (not p.stop and not p.stop_regex and tok not in p.stop_token_set
                and (p.ignore_eos or tok not in self.eos_ids) and len(out) < p.max_new_tokens
                and len(req.input_ids) + len(out) + req.tokens_on_device < self.context_len
                and (req.grammar is None or grammars is None or not grammars.is_terminated(req))):
            return None  # the usual row (a JSON row's too) in one test: none of the checks below can hold
        if tok in p.stop_token_set:
            return FinishReason.stop(tok)
        if not p.ignore_eos and tok in self.eos_ids:
            return FinishReason.stop(tok)
        if req.grammar is not None and grammars is not None and grammars.is_terminated(req):
            if getattr(req, "grammar_failed", False):  # no token satisfied the constraint: never a normal stop
                return FinishReason.abort(GRAMMAR_DEAD_END, status_code=500)
            return FinishReason.stop(None)
        if p.stop and self.tokenizer is not None:
            window = max(len(s) for s in p.stop) + 3
            tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in tail:
                    return FinishReason.stop(s)
        if p.stop_regex and self.tokenizer is not None:
            regexes = compile_stop_regexes(p.stop_regex)
            ids = req.output_ids if regexes.window_tokens is None else req.output_ids[-regexes.window_tokens:]
            try:
                matched = regexes.search(self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens))
            except StopRegexTooSlow as exc:  # a backtracking pattern: fail this request, not the loop
                return FinishReason.abort(str(exc), status_code=400)
            if matched is not None:
                return FinishReason.stop(matched, regex=True)
        if len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.context_len:
            return FinishReason.of_length(len(req.output_ids))
        return None
