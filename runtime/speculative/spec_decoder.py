"""The scheduler's speculative-decoding planner: which tokens each running request verifies this step.

Owned by the Scheduler (one per scheduler process). Per decode step: the drafter (NGRAM: prompt
lookup; STANDALONE: a draft model, draft_model.py; EAGLE3: a draft head fed by the target's hidden
states, eagle_drafter.py) proposes up to `--speculative-num-steps` tokens
per request; the budget
(draft_budget.py) keeps those worth their verify rows; a constrained request's drafts are cut at
the first token its grammar refuses, and the masks of the positions to verify are taken on the way.
Verification itself (result processing) emits exactly what decoding would have, so nothing here
can change an output, only how many steps it takes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.request import Req
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.speculative.draft_budget import BETA, Acceptance, grant, grant_tree_nodes, worth_drafting
from radixlm.runtime.speculative.draft_payoff import DraftPayoff
from radixlm.runtime.speculative.drafts import Drafts
from radixlm.runtime.speculative.ngram import OCCURRENCES, STEP_TOKENS, NgramDrafter
from radixlm.runtime.speculative.row_cost import RowCost
from radixlm.runtime.speculative.row_regimes import kernel_thresholds, max_step_rows

if TYPE_CHECKING:
    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.speculative.draft_model import DraftModelDrafter
    from radixlm.runtime.speculative.eagle_drafter import EagleDrafter


WARM_TOKENS = 2048  # n-gram index backlog indexed per overlapped step (host time its forward hides) ...
# ... and at most this much host time per step (checked after each request): 2048 tokens are ~2-7 ms of Python on
# the 2-core CPU, more than the host's slack under a batch-64 step; the first 16 of a 64 x 512-token run's steps
# each indexed 2048, and spec on with drafting off ran 1-2% behind spec off on the H200 (2026-12-04, first call)
WARM_S = 0.25e-3
# ... and only requests at least this many tokens behind (a prompt; outputs decoded while drafting was off): indexing
# every request's few new tokens as they came cost 0.56 ms of host time a step at batch 64 on the H200 (2026-12-04
# mid round), drafting off; a first drafting step then syncs at most this many tokens a request
WARM_MIN_BEHIND = 64
WARM_MAX_INDEXED = 1 << 18  # ... while all indexes hold fewer tokens than this (~300 MB)
# ... and only while the payoff may let a step draft within this many steps (or one a running request, if more): with
# drafting off (batch 64 on the H200: a probe's loss outweighs the exploring budget for ~300 steps) a spec-on step
# costs what a spec-off one does; this lead time lets the backlog (a request or more a step) shrink before it drafts
WARM_LEAD_STEPS = 32
# NGRAM chains with the overlap schedule (a GPU), batches of up to this many rows: every request drafts as deep as the
# step's k allows (its n-gram match permitting), not its own DraftDepth, which after a rejection falls to the accepted
# count + 1 and climbs back 2 a step: a batch-1 verify step costs about the same at any k on the H200 (4.40 / 4.82 ms
# at k = 1 / 4 against 4.16 plain, 2026-12-04), so a shallow draft saves little and emits fewer tokens. On for batch 1
# since the H200 A/B of 2026-12-05 (`benchmarks/speculative.py --deep-ab`: x1.515 / 1.667 against 1.373 / 1.412 off,
# benchmarks/RESULTS.md); 0 turns it off
FULL_DEPTH_ROWS = 1
# ... and, off until a GPU A/B (`speculative.py --short-ab`, spec9): a single matching token drafts (SHORT_MATCH_ROWS),
# no match resumes the last chain's copy source (COPY_SOURCE_ROWS, copy_source.py), matches of 1-3 tokens draft k deep
# (SHORT_DEPTH_ROWS), rather than plain steps (~29 of a 128-token batch-1 run's ~64 steps on the H200, 2026-12-05)
SHORT_MATCH_ROWS = COPY_SOURCE_ROWS = SHORT_DEPTH_ROWS = 0


def prepare_draft_model(args: ServerArgs) -> tuple[Path | None, tuple[int, int]]:
    """STANDALONE / EAGLE3: the draft model's (head's) folder and the GPU memory the target must leave
    it, before the target sizes its KV pool."""
    if args.speculative_algorithm not in ("STANDALONE", "EAGLE3"):
        return None, (0, 0)
    from radixlm.runtime.speculative.draft_model import draft_memory
    from radixlm.runtime.speculative.eagle_drafter import head_memory
    from radixlm.runtime.speculative.eagle_head import head_folder

    draft_dir = head_folder(args)
    device = torch.device(args.device or "cpu")
    if device.type != "cuda":
        return draft_dir, (0, 0)
    if args.speculative_algorithm == "EAGLE3":
        return draft_dir, head_memory(draft_dir, torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype))
    return draft_dir, draft_memory(draft_dir, args.dtype, device)


class SpecDecoder:
    def __init__(self, args: ServerArgs, runner: ModelRunner, draft_dir: Path | None) -> None:
        self.algorithm = args.speculative_algorithm
        self.max_drafts = args.speculative_max_drafts
        self.topk = args.speculative_topk
        self.tree_nodes = args.speculative_tree_nodes
        self.context_len = runner.context_len
        self.beta = BETA.get(runner.device.type, BETA["cuda"])
        chains = not args.disable_overlap_schedule and self.topk == 1  # (as full_depth_rows)
        self.short_match_rows, self.copy_source_rows, self.short_depth_rows = (
            (SHORT_MATCH_ROWS, COPY_SOURCE_ROWS, SHORT_DEPTH_ROWS) if chains else (0, 0, 0))
        self.drafter = NgramDrafter(OCCURRENCES if self.topk > 1 else 1, short=self.short_match_rows > 0)
        self.model: DraftModelDrafter | EagleDrafter | None = None
        self.eagle: EagleDrafter | None = None
        if draft_dir is not None and self.algorithm == "EAGLE3":
            from radixlm.runtime.speculative.eagle_drafter import EagleDrafter

            self.model = self.eagle = EagleDrafter(draft_dir, runner, self.max_drafts)
            self.aux_source = runner.model
        elif draft_dir is not None:
            from radixlm.runtime.speculative.draft_model import DraftModelDrafter

            self.model = DraftModelDrafter(args, draft_dir, runner.vocab_size, runner.max_total_tokens,
                                           runner.max_running_requests)
        self.acceptance: dict[int, Acceptance] = {}
        # NGRAM chains: requests whose last lookup found nothing to draft. While every running request is
        # dry, decode steps stay overlapped (`may_draft`); `refresh` looks again once a step's tokens are in.
        self.dry: set[int] = set()
        # ... with the overlap schedule only (without it no step is overlapped; benchmarks/speculative.py --dry-ab
        # turns it off to measure the steps as before)
        self.dry_overlap = not args.disable_overlap_schedule
        # n-gram indexes warmed only near a step that may draft (`warm`; benchmarks/speculative.py turns it off to
        # measure warming every step, as before)
        self.lazy_warm = True
        # chains drafted as deep as the step's k at up to this many rows (0: each request's depth alone, as on the
        # CPU, where a verify row costs a fifth of a step or more; benchmarks/speculative.py sets 1 to compare)
        self.full_depth_rows = FULL_DEPTH_ROWS if not args.disable_overlap_schedule and self.topk == 1 else 0
        # CPU: the row counts where the linears switch kernels (a step's drafts must not cross one).
        self.thresholds = kernel_thresholds(runner.model) if runner.device.type == "cpu" else ()
        # The payoff's clock: on the CPU the step's compute is its cost, so process CPU time (wall
        # time on a shared CPU measures the neighbours' load as much as the step); elsewhere wall time.
        self.clock = time.process_time if runner.device.type == "cpu" else time.perf_counter
        # Without overlap scheduling (the CPU): a draft row's cost at batch 1, measured, prices the budget's
        # drafts there, and the payoff leaves batch 1 to the budget (row_cost.py).
        self.row_cost = RowCost() if runner.device.type == "cpu" and args.disable_overlap_schedule else None
        self._step_drafts = 0  # draft tokens of the step being scheduled
        # Measured per batch size: does a step that may draft beat plain (overlapped) decoding here?
        # None: always may draft (the budget alone decides).
        self.payoff: DraftPayoff | None = (DraftPayoff(self.max_drafts, 2 if self.row_cost is not None else 1)
                                           if args.speculative_adaptive == "on" else None)
        self.step_k = self.max_drafts  # this step's draft limit per request (0: plain decoding)
        self.allowed = True  # this step may carry drafts
        # Totals since start: verify steps (a request step that carried drafts), tokens emitted by
        # them (accepted drafts + the token sampled after them), drafts proposed and accepted.
        self.verify_steps = 0
        self.verify_tokens = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0

    def _acceptance(self, req: Req) -> Acceptance:
        acc = self.acceptance.get(id(req))  # (not setdefault: read for every row each step, it built one each time)
        if acc is None:
            acc = self.acceptance[id(req)] = Acceptance()
        return acc

    def begin_step(self, now: float, generated: int, running: int) -> None:
        """At the start of each scheduler step: the clock (`self.clock`), tokens generated so far, running requests."""
        if self.row_cost is not None:
            self.row_cost.begin_step(now, running)
        self.step_k = self.payoff.begin_step(now, generated, running) if self.payoff is not None else self.max_drafts
        self.allowed = self.step_k > 0
        self.drafter.min_depth = self.step_k if 0 < running <= self.full_depth_rows else 0
        self.drafter.min_match = 1 if 0 < running <= self.short_match_rows else 2
        self.drafter.follow_source = 0 < running <= self.copy_source_rows
        self.drafter.deep_short = 0 < running <= self.short_depth_rows
        self.drafter.step_tokens = STEP_TOKENS
        self._step_drafts = 0

    def scheduled(self, plain_decode: bool, drafted: bool, reqs: list[Req] | None = None) -> None:
        """The step that began runs a plain decode batch (with or without drafts): it is measured. Not a
        drafting arm's step without drafts whose every row (`reqs`) is dry: it decodes plainly,
        overlapped, whatever the arm, so it says nothing about the arm."""
        if self.payoff is not None:
            dry = (self.dry_overlap and self.step_k > 0 and not drafted and bool(self.dry) and reqs is not None
                   and all(id(r) in self.dry for r in reqs))
            self.payoff.scheduled(plain_decode and not dry, drafted)
        if self.row_cost is not None:
            self.row_cost.scheduled(plain_decode, 1 + (self._step_drafts if drafted else 0))

    def _beta(self, rows: int) -> float:
        """The budget's price of a draft token at this batch size: measured at batch 1 without overlap."""
        return self.row_cost.beta(self.beta) if self.row_cost is not None and rows == 1 else self.beta

    def warm(self, running: list[Req]) -> None:
        """NGRAM, while the device runs an overlapped (plain) step: index the prompts of running
        requests whose n-gram index is more than WARM_MIN_BEHIND tokens behind, up to WARM_TOKENS tokens and
        WARM_S seconds a step (a request at least, whatever its time: the backlog always shrinks). A request's first
        drafting step then does not pay its prompt's indexing (64 prompts of 512 tokens: tens of ms of
        host time in one step, which the payoff would charge to its first drafting run). Only within
        WARM_LEAD_STEPS (or a step per running request) of a step the payoff may let draft."""
        if not self._may_index(len(running)):
            return
        spent, deadline = 0, time.perf_counter() + WARM_S
        for req in running:
            if spent >= WARM_TOKENS or (spent and time.perf_counter() > deadline):
                break
            if not req.finished:
                spent += self.drafter.warm(id(req), req.input_ids, req.output_ids, WARM_MIN_BEHIND, WARM_TOKENS - spent)

    def _may_index(self, rows: int) -> bool:
        """NGRAM indexes may be built ahead of drafting: not while the payoff keeps drafting off for a while
        (nothing to index for yet), nor past WARM_MAX_INDEXED tokens (host memory: ~1.2 KB an indexed token;
        drafting off at a large batch stops it here)."""
        if self.model is not None:
            return False
        if self.lazy_warm and self.payoff is not None and self.payoff.steps_to_draft() > max(WARM_LEAD_STEPS, rows):
            return False
        return sum(len(index.tokens) for index in self.drafter.indexes.values()) < WARM_MAX_INDEXED

    def after_forward(self, batch: ScheduledBatch) -> None:
        """Right after the target's forward (launched), EAGLE3 keeps its hidden states of the batch's tokens;
        NGRAM indexes each prefill chunk's prompt tokens, so a request drafts from its first decode step
        without its whole prompt indexed in one step: at most the chunk's tokens, or STEP_TOKENS where a
        cached prefix makes the chunk short."""
        if self.eagle is not None and self.aux_source.aux_hidden is not None:
            self.eagle.stash(batch.reqs, batch.prefix_lens, batch.extend_lens, self.aux_source.aux_hidden)
        if batch.mode is ForwardMode.DECODE or not self._may_index(len(batch.reqs)):
            return
        for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            end = prefix + extend
            if not req.output_ids and end <= len(req.input_ids) and not req.finished:  # a prefill chunk
                self.drafter.index_upto(id(req), req.input_ids, end, max(extend, STEP_TOKENS))

    def may_draft(self, running: list[Req]) -> bool:
        """Whether the next decode step may carry drafts: then the scheduler needs every running
        request's last token on the host (drafts continue it), so an overlapped step is committed first.
        Not while every running request is dry: text the n-gram index cannot follow (a request's start
        before it repeats anything) decodes overlapped, as without speculation, and drafting resumes a
        step after `refresh` finds a match (on the H200 a synchronous plain step cost ~0.6-1 ms more)."""
        if not self.allowed or (self.dry_overlap and self.dry and all(id(r) in self.dry for r in running)):
            return False
        return worth_drafting([self._acceptance(r).rate for r in running], self._beta(len(running)))

    def refresh(self, running: list[Req]) -> None:
        """After an overlapped step's tokens are appended: a dry request whose text now ends in an n-gram
        seen before is dry no more (the next step commits first and drafts). Only while this step's arm
        drafts (else nothing drafts next step either)."""
        if not self.dry or not self.allowed or not self.dry_overlap:
            return
        for req in running:
            key = id(req)
            if key in self.dry and (req.finished or self.drafter.propose(key, req.input_ids, req.output_ids, 1)):
                self.dry.discard(key)

    def _limit(self, req: Req) -> int:
        if req.tokens_on_device or req.finished:
            return 0
        return max(min(self.step_k, req.remaining_new_tokens() - 1, self.context_len - req.fill_len), 0)

    def propose(self, reqs: list[Req], grammars: GrammarRuntime | None) -> Drafts:
        """Each request's drafts for this step; trees (topk > 1) unless the request is constrained."""
        drafts = self._drafts(reqs, grammars) if self.allowed else Drafts([[] for _ in reqs], [None] * len(reqs))
        self._step_drafts = drafts.total
        return drafts

    def _drafts(self, reqs: list[Req], grammars: GrammarRuntime | None) -> Drafts:
        rates, beta, limit = self._grant_terms(reqs)
        if self.model is not None:  # drafting costs model passes: grant first, then draft only those
            granted = grant([self._limit(r) for r in reqs], rates, beta, limit)
            proposed = self.model.propose(reqs, granted)
        elif self.topk > 1:
            return self._propose_trees(reqs, grammars, rates, beta, limit)
        else:
            limits = [self._limit(r) for r in reqs]
            proposed = [self.drafter.propose(id(r), r.input_ids, r.output_ids, n) for r, n in zip(reqs, limits)]
            for req, n, p in zip(reqs, limits, proposed):
                if n > 0:
                    (self.dry.discard if p else self.dry.add)(id(req))
            granted = grant([len(p) for p in proposed], rates, beta, limit)
        return self._checked(reqs, grammars, [p[:n] for p, n in zip(proposed, granted)])

    def guess_after(self, reqs: list[Req], drafts: list[list[int]], stop_ids: frozenset[int]) -> list[list[int]] | None:
        """For a verify step in flight (NGRAM chains): per request the token guessed to follow its drafts
        (its bonus, if every draft is accepted), then the drafts of the step after, granted as `propose`
        grants them. None unless every row gets drafts and neither its drafts nor the guess could end
        the request (a stop token; the length and context limits leave the next step room to draft)."""
        if not self.allowed or self.model is not None or self.topk > 1:
            return None
        conts = []
        for req, d in zip(reqs, drafts):
            limit = self._limit_after(req, len(d) + 1)
            if not d or limit < 1:
                return None
            cont = self.drafter.guess_after(id(req), req.input_ids, req.output_ids, d, limit + 1)
            if len(cont) < 2 or self._stops(req, [*d, cont[0]], stop_ids):
                return None
            conts.append(cont)
        granted = self._granted(reqs, [len(c) - 1 for c in conts])
        return None if granted is None else [c[: 1 + n] for c, n in zip(conts, granted)]

    def propose_after(self, reqs: list[Req], runs: list[list[int]], drafted: list[int], stop_ids: frozenset[int]
                      ) -> list[list[int]] | None:
        """For a verify step whose outcome is known but not yet appended (NGRAM chains): per request the
        drafts of the step after its `run` (accepted drafts and the token after them, of `drafted`
        drafts), granted as `propose` grants them. None unless every row gets drafts and no run token
        could end its request."""
        if not self.allowed or self.model is not None or self.topk > 1:
            return None
        proposed = []
        for req, run, n in zip(reqs, runs, drafted):
            limit = self._limit_after(req, len(run))
            if limit < 1 or self._stops(req, run, stop_ids):
                return None
            proposed.append(self.drafter.propose_after(id(req), req.input_ids, req.output_ids, run, n, limit))
        granted = self._granted(reqs, [len(p) for p in proposed])
        return None if granted is None else [p[:n] for p, n in zip(proposed, granted)]

    def _limit_after(self, req: Req, appended: int) -> int:
        """`_limit` once `appended` more tokens are in the request's output."""
        after = len(req.output_ids) + appended
        return min(self.step_k, req.params.max_new_tokens - after - 1, self.context_len - req.fill_len - appended)

    @staticmethod
    def _stops(req: Req, tokens: list[int], stop_ids: frozenset[int]) -> bool:
        p = req.params
        stops = p.stop_token_ids if p.ignore_eos else stop_ids.union(p.stop_token_ids)
        return any(t in stops for t in tokens)

    def _grant_terms(self, reqs: list[Req]) -> tuple[list[float], float, int | None]:
        """What the budget weighs for these rows: their acceptance rates, the price of a draft token and the
        step's draft-row limit (None: no limit)."""
        rows = max_step_rows(self.thresholds, len(reqs))
        return ([self._acceptance(r).rate for r in reqs], self._beta(len(reqs)),
                None if rows is None else rows - len(reqs))

    def _granted(self, reqs: list[Req], proposed: list[int]) -> list[int] | None:
        """`grant` over the rows' proposals; None unless every row keeps a draft."""
        granted = grant(proposed, *self._grant_terms(reqs))
        return granted if all(granted) else None

    def _propose_trees(self, reqs: list[Req], grammars: GrammarRuntime | None, rates: list[float], beta: float,
                       limit: int | None) -> Drafts:
        """NGRAM trees: depth up to the step's k, nodes up to k x topk (and --speculative-num-draft-tokens
        - 1); the budget grants nodes in the tree's order (parents first). Constrained rows draft the
        first chain (the matcher walks one path)."""
        nodes = min(self.tree_nodes, self.step_k * self.topk)
        trees = [self.drafter.propose_tree(id(r), r.input_ids, r.output_ids, self._limit(r), nodes, self.topk)
                 for r in reqs]
        trees = [t.cut(n) for t, n in zip(trees, grant_tree_nodes(trees, rates, beta, limit))]
        chains = [t.first_chain() if r.grammar is not None or t.is_chain else None for r, t in zip(reqs, trees)]
        checked = self._checked(reqs, grammars, [c if c is not None else [] for c in chains], idle=False)
        tokens = [c if chain is not None else t.tokens for c, chain, t in zip(checked.tokens, chains, trees)]
        parents = [None if c is not None else t.parents for c, t in zip(chains, trees)]
        for req, tok in zip(reqs, tokens):
            if not tok:
                self._acceptance(req).idle()
        return Drafts(tokens, checked.masks, parents if any(p is not None for p in parents) else None)

    def _checked(self, reqs: list[Req], grammars: GrammarRuntime | None, chains: list[list[int]],
                 idle: bool = True) -> Drafts:
        """Chains cut at the first token a constrained request's grammar refuses, with its masks;
        `idle`: a row left without drafts counts a step without drafting."""
        tokens: list[list[int]] = []
        masks: list[torch.Tensor | None] = []
        for req, drafts in zip(reqs, chains):
            mask = None
            if drafts and req.grammar is not None:
                assert grammars is not None
                drafts, mask = grammars.check_drafts(req, drafts)
            if not drafts:
                if idle:
                    self._acceptance(req).idle()
                mask = None
            tokens.append(drafts)
            masks.append(mask)
        return Drafts(tokens, masks)

    def on_verified(self, req: Req, drafted: int, accepted: int, emitted: int, depth: int | None = None) -> None:
        """A verify result: `drafted` tokens (tree nodes), `accepted` kept; `depth`: a tree's depth (its
        acceptance and the drafter's depth count positions along the path, as a chain of that depth's)."""
        self._acceptance(req).record(depth or drafted, accepted)
        if self.payoff is not None:
            self.payoff.on_verified(depth or drafted, accepted)
        if self.model is not None:
            self.model.on_verified(id(req), accepted)
        else:
            self.drafter.on_verified(id(req), depth or drafted, accepted)
        self.verify_steps += 1
        self.verify_tokens += emitted
        self.draft_tokens += drafted
        self.accepted_tokens += accepted

    def forget(self, req: Req) -> None:
        """The request finished or was retracted: its drafting state (and draft KV) goes."""
        self.acceptance.pop(id(req), None)
        self.dry.discard(id(req))
        self.drafter.forget(id(req))
        if self.model is not None:
            self.model.forget(id(req))

    def info(self) -> dict[str, float | int | None]:
        return {
            "spec_verify_steps": self.verify_steps,
            "spec_verify_tokens": self.verify_tokens,
            "spec_draft_tokens": self.draft_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "avg_spec_accept_length": self.verify_tokens / self.verify_steps if self.verify_steps else None,
        }
