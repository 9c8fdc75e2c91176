"""The scheduler: continuous batching with chunked prefill, prefix reuse, retraction and abort.

Each step: take in new messages -> schedule a batch -> launch it -> process its results. Outputs go
back to the tokenizer process as ReqOutput deltas.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from radixlm.runtime import step_order
from radixlm.runtime.decode_log import DecodeLog
from radixlm.runtime.decode_schedule import schedule_decode
from radixlm.runtime.fault_isolation import recover_from_step_error
from radixlm.runtime.forced_rows import plan_rides, resolve_guesses
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.gen_rate import GenRate
from radixlm.runtime.io_struct import AbortReq, ControlReq, ControlResp, FinishReason, ReqOutput, TokenizedGenerateReq
from radixlm.runtime.lora.admission import AdapterDemand, WaitingQueue
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.prefill_admission import schedule_prefill
from radixlm.runtime.prefill_as_decode import runs_as_decode
from radixlm.runtime.prefix_cache import NoPrefixCache, PrefixCache, RadixPrefixCache
from radixlm.runtime.request import Req
from radixlm.runtime.request_intake import add_request
from radixlm.runtime.result_processor import ResultProcessor, SeqEvent
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.schedule_policy import DecodeReserve
from radixlm.runtime.scheduler_control import control, info
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.speculative import verify_ahead
from radixlm.runtime.speculative.spec_decoder import SpecDecoder, prepare_draft_model
from radixlm.runtime.speculative.tree_kv import TreeKV
from radixlm.runtime.step_results import after_prefill, apply_events, launch_prefill
from radixlm.runtime.uncommitted_step import UncommittedStep

logger = logging.getLogger(__name__)

class Scheduler:
    def __init__(self, args: ServerArgs, model_dir: Path, tokenizer: object) -> None:
        self.args = args
        self.model_dir = model_dir
        draft_dir, draft_reserve = prepare_draft_model(args)
        self.runner = ModelRunner(args, model_dir, draft_reserve)
        self.kv_pool = self.runner.kv_pool
        self.req_to_token_pool = self.runner.req_to_token_pool
        self.req_to_token = self.req_to_token_pool.req_to_token
        cache_cls = NoPrefixCache if args.disable_radix_cache else RadixPrefixCache
        self.cache: PrefixCache = cache_cls(self.req_to_token_pool, self.kv_pool)
        self.device = self.runner.device
        chunk = args.chunked_prefill_size
        self.chunk_size = chunk if chunk > 0 else 1 << 30  # -1: no chunking
        self.max_prefill_tokens = max(args.max_prefill_tokens, min(self.chunk_size, 1 << 20))
        self.max_running = self.runner.max_running_requests
        self.reserve = DecodeReserve(args.schedule_conservativeness)
        self.rng = random.Random(args.random_seed)
        self.tokenizer = tokenizer
        eos = set(self.runner.model_config.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.results = ResultProcessor(tokenizer, eos, self.runner.context_len,
                                       jump_forward=not args.disable_jump_forward,
                                       decode_graphs=self.runner.graph_runner is not None,
                                       prompt_rows_running=not args.disable_overlap_constrained_prefill)  # (step_order)
        self.grammars: Any = None  # GrammarRuntime, created on the first constrained request
        self.spec: SpecDecoder | None = None
        if args.speculative_algorithm is not None:
            self.spec = SpecDecoder(args, self.runner, draft_dir)
        self.tree_kv = TreeKV(self.req_to_token_pool, self.kv_pool)  # draft trees' lanes and node slots

        self.waiting: list[Req] = WaitingQueue()  # (counts its requests per adapter: LoRA admission)
        self.adapter_demand = AdapterDemand()  # --enable-lora: aging of adapters waiting for a device slot
        self.running: list[Req] = []
        # Requests holding KV for only part of their fill_ids: a chunked prefill in progress, or
        # grammar-forced tokens appended by jump-forward. Extended before new admissions.
        self.partial: list[Req] = []
        self.outputs: list[ReqOutput] = []
        self.overlap = not args.disable_overlap_schedule
        self.overlap_prefill = step_order.overlap_prefill_allowed(self)  # prompts-only steps of many requests
        # Overlap scheduling: the decode step sampled on the device and not yet appended.
        self.uncommitted: UncommittedStep | None = None
        # NGRAM chains: a verify step launched before the previous one's results (speculative/verify_ahead.py).
        self.spec_ahead = self.overlap and not args.disable_speculative_ahead
        self.ahead: verify_ahead.AheadStep | None = None
        # The last overlapped commit found a grammar-forced run worth a jump: commit before the next step.
        self.jump_due = False
        # What the current step has touched, for fault isolation (fault_isolation.py): the batches
        # it built and the uncommitted step there was when it began.
        self.step_batches: list[ScheduledBatch] = []
        self.step_uncommitted: UncommittedStep | None = None
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "retractions": 0,
                      "forward_steps": 0, "cascade_decode_steps": 0, "last_gen_throughput": 0.0,
                      # forward steps by kind: prefill alone / prefill with the decode rows / decode, and
                      # the decode steps committed a step later (overlapped with the next step's forward)
                      "prefill_steps": 0, "mixed_steps": 0, "decode_steps": 0, "overlapped_steps": 0,
                      # prefill steps whose first tokens were committed a step later
                      "overlapped_prefill_steps": 0,
                      # prefill (or mixed) steps of one sampled token a row run as decode steps (prefill_as_decode.py)
                      "prefill_as_decode_steps": 0,
                      # verify steps launched before the previous verify step's results were processed (of
                      # them, built after a wrong guess at those results)
                      "ahead_steps": 0, "ahead_rebuilt_steps": 0,
                      # grammar-forced tokens computed as extra decode rows (forced_rows.py): tokens that rode
                      # after a sampled one, guess rows, the guesses taken and their tokens, rows left out of the
                      # step after a forced run that ends them
                      "forced_ride_tokens": 0, "forced_guess_rows": 0, "forced_guess_hits": 0, "forced_guess_tokens": 0,
                      "forced_end_rows": 0}
        self.gen_rate = GenRate()
        self.decode_log = DecodeLog(args.decode_log_interval)
        # Objects the scheduler process froze after start-up (scheduler_process.freeze_startup_heap), counted
        # there once: info() runs every --decode-log-interval decode steps, and gc.get_freeze_count() walks
        # the whole frozen heap (40-60 ms for ~300k objects on the 2-core CPU: a stall in the decode loop).
        self.frozen_objects = 0
        # /load_lora_adapter's reads on a thread, replies from the loop (lora/background_load.py); set by
        # the scheduler process. None: loads run inside handle() (in-process callers).
        self.adapter_loads: Any = None

    # ---------------------------------------------------------------- messages
    def handle(self, msg: object) -> ControlResp | None:
        if isinstance(msg, ControlReq):
            self.settle()  # a verify step in flight holds KV of tokens not yet appended
        if isinstance(msg, TokenizedGenerateReq):
            add_request(self, msg)
        elif isinstance(msg, AbortReq):
            self.abort(msg.rid, msg.message)
        elif isinstance(msg, ControlReq):
            return control(self, msg)
        return None

    def _grammar_runtime(self) -> Any:
        if self.grammars is None:
            from radixlm.runtime.grammar_runtime import GrammarRuntime

            path = self.args.tokenizer_path or str(self.model_dir)
            self.grammars = GrammarRuntime(self.args, self.tokenizer, path, self.runner.vocab_size)
        return self.grammars

    def _poll_grammars(self) -> None:
        if self.grammars is None:
            return
        for req, error in self.grammars.poll():
            if error is not None and req in self.waiting:
                self.waiting.remove(req)
                self._finish(req, FinishReason.abort(str(error), status_code=400))

    def info(self) -> dict:
        return info(self)

    def abort(self, rid: str, message: str) -> None:
        self.abort_many([AbortReq(rid, message)])

    def abort_many(self, aborts: list[AbortReq]) -> None:
        """Aborts in one pass over the queues: one by one, 1,000 queued requests' aborts (abort_all) scanned
        the queues 1,000 times, 67 ms of the loop on the 2-core CPU (quadratic: 176 ms at 2,000)."""
        self.settle()  # a verify step in flight holds KV of tokens not yet appended: its results first
        messages: dict[str, str] = {}
        for a in aborts:
            messages.setdefault(a.rid, a.message)
        for queue in (self.waiting, self.running, self.partial):
            hit = [r for r in queue if r.rid in messages or r.group_rid in messages]
            if not hit:
                continue
            gone = set(map(id, hit))
            queue[:] = [r for r in queue if id(r) not in gone]
            for req in hit:
                if self.grammars is not None:
                    self.grammars.forget(req)
                self._finish(req, FinishReason.abort(messages.get(req.rid) or messages[req.group_rid]))

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.partial or self.uncommitted or self.ahead)

    def settle(self) -> None:
        """Process the results of a verify step launched ahead, if one is in flight (and launch nothing)."""
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            self.process_results(ahead.batch, ahead.logits)

    # ---------------------------------------------------------------- main step
    def step(self) -> bool:
        """Run one batch if there is work. Returns False when idle.

        With overlap scheduling a plain decode step is launched before the previous one is
        committed: the host appends step k's tokens while the device already runs step k+1.
        An exception fails only the requests the step touched (fault_isolation.py); it raises
        SchedulerFatalError only when the device or the pools can no longer be trusted."""
        self.step_batches, self.step_uncommitted = [], self.uncommitted
        self.tree_kv.settled.clear()
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 - isolate the fault to this step's requests
            failed = recover_from_step_error(self, exc)
            logger.error("a scheduler step failed; failed its %d request(s) %s and continued",
                         len(failed), failed[:8], exc_info=exc)
            return True

    def _step(self) -> bool:
        self._poll_grammars()
        if self.spec is not None:
            self.spec.begin_step(self.spec.clock(), self.stats["generated_tokens"], len(self.running))
        if self.ahead is not None:  # a verify step in flight: its results, and the next one launched ahead
            return verify_ahead.step(self)
        if self.uncommitted is not None and not self._can_schedule_before_commit():
            self._commit_step()
        batch = self._schedule_prefill()
        if batch is not None and self.running and self._should_mix(batch):
            self._commit_step()  # the decode rows' inputs must be on the host
            decode = self._schedule_decode(mixed=True)
            if decode is not None:
                batch.absorb(decode)
        batch = batch or self._schedule_decode()
        if batch is None:
            if self.grammars is not None:
                self.grammars.file_completed_rows()
            return self._commit_step()
        self.decode_log.on_step(batch.mode, self.info)
        if self.spec is not None:
            self.spec.scheduled(batch.mode == ForwardMode.DECODE, batch.has_drafts, batch.reqs)
        as_decode = runs_as_decode(self, batch)  # one sampled token a row: the decode step's shape
        fb, slot_writes = batch.to_forward_batch(self.device, self.uncommitted, self.runner.cascade, as_decode)
        if self.runner.lora is not None and batch.mode is ForwardMode.EXTEND and fb.lora_names is not None:
            # a prefill without (some of) the decode rows: their adapters keep their slots
            fb.lora_keep = frozenset(r.lora_name for r in (*self.running, *self.partial) if r.lora_name is not None)
        self.req_to_token_pool.commit(slot_writes)
        logits = self.runner.forward(fb)
        if self.grammars is not None:
            self.grammars.file_completed_rows()  # while the device runs this forward pass
        if self.spec is not None:
            self.spec.after_forward(batch)  # EAGLE3 keeps the target's hidden states of these tokens
        self.stats["forward_steps"] += 1
        self.stats["cascade_decode_steps"] += fb.cascade is not None
        self.stats["prefill_as_decode_steps"] += as_decode
        kind = "decode_steps" if batch.mode == ForwardMode.DECODE else "mixed_steps" if any(batch.decoding) else "prefill_steps"
        self.stats[kind] += 1
        if self.overlap and self.results.can_defer(batch):
            self.stats["overlapped_steps"] += 1
            previous, self.uncommitted = self.uncommitted, None
            advanced = prepared = None
            if previous is not None and any(r.grammar is not None for r in batch.reqs):
                # Grammar masks need step k's tokens in the matchers: the matchers take them now, while
                # this step's forward pass runs, and the masks are applied as this step is sampled; the
                # rest of step k's commit (appends, finish checks, outputs) runs after the launch, as for
                # unconstrained rows (the tokens still count as on the device until then). What the draw
                # reads but the masks is built first, while the host would wait for those tokens.
                if step_order.sampling_before_tokens(self, batch):
                    prepared = self.results.prepare_sampling(batch.reqs, logits.shape[1], logits.device)
                reqs, ids = previous.peek_tokens()
                advanced = self.results.advance_grammars(reqs, ids, self.grammars, len(self.running), allow_jump=False,
                                                         rides=previous.live_rides())
            rows = resolve_guesses(self, batch, previous) if batch.guesses is not None or batch.guess_seen else None
            if rows is not None:  # rows whose token just committed forces a run: sampled after what they took
                logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True))
            self.uncommitted = self._launch(batch, logits, prepared)
            if self.spec is not None:
                self.spec.warm(self.running)  # n-gram indexes, while the device runs this step
            if previous is not None:
                self._commit_step(previous, allow_jump=False, advanced=advanced)
                if self.spec is not None:
                    self.spec.refresh(self.running)  # (a dry request whose text now repeats may draft again)
            return True
        if step_order.overlaps_prefill(self, batch):
            # The host schedules and launches the next step while the device runs this one; the
            # pending step (if any) is a prefill step too (only those let a prefill go first).
            self.stats["overlapped_prefill_steps"] += 1
            previous, self.uncommitted = self.uncommitted, None
            self.uncommitted = launch_prefill(self, batch, logits)
            if previous is not None:
                self._commit_step(previous, allow_jump=False)
            return True
        # This batch already consumes the pending step's tokens: they are committed without a jump
        # (one would rewrite them); this step's own results may jump, all its tokens being on the host.
        self._commit_step(allow_jump=False)
        if verify_ahead.eligible(self, batch):
            self.ahead = verify_ahead.run(self, batch, logits)
            return True
        self.process_results(batch, logits)
        return True

    def _launch(self, batch: ScheduledBatch, logits: torch.Tensor, prepared: Any = None) -> UncommittedStep:
        """Sample on the device; the host appends these tokens a step later (`_commit_step`), with the
        grammar-forced tokens that ride after them (forced_rows.py). `prepared`: the rows' sampling values,
        built earlier in the step (`ResultProcessor.prepare_sampling`)."""
        rides, ends, guessing = plan_rides(self, batch.reqs) if self.grammars is not None else (None, None, None)
        return UncommittedStep.start(batch.reqs, self.results.sample(batch.reqs, logits, self.grammars,
                                                                     logits_needed_after=False, prepared=prepared),
                                     rides=rides, ends=ends, guess_candidates=guessing)

    def process_results(self, batch: ScheduledBatch, logits: torch.Tensor, targets: list[int] | None = None,
                        dropped: bool = False) -> None:
        """A synchronous step's results: KV bookkeeping, then sampling and stops, then their events.
        `targets`: a verify batch's target tokens, drawn already; `dropped`: its rejected drafts' slots
        were freed already (speculative/verify_ahead.py)."""
        forks = after_prefill(self, batch)
        events = self.results.process(batch, logits, forks, self.grammars, len(self.running), targets)
        self._apply([e._replace(unverified=0) for e in events] if dropped else events)

    def _commit_step(self, step: UncommittedStep | None = None, allow_jump: bool = True,
                     advanced: set[int] | None = None) -> bool:
        """Append the tokens of an uncommitted step (by default the scheduler's own). `allow_jump=False`
        while a step that consumes these tokens is already launched; `advanced`: the grammars took them."""
        if step is None:
            step, self.uncommitted = self.uncommitted, None
        if step is None:
            return False
        rides = step.live_rides()
        reqs, ids = step.take_tokens()
        self._apply(self.results.commit(reqs, ids, self.grammars, len(self.running), allow_jump, advanced, rides))
        return True

    def _should_mix(self, batch: ScheduledBatch) -> bool:
        """`step_order.should_mix` (a method: tests wrap it per scheduler)."""
        return step_order.should_mix(self, batch)

    def _can_schedule_before_commit(self) -> bool:
        """`step_order.can_schedule_before_commit` (a method: tests and benchmarks wrap it per scheduler)."""
        return step_order.can_schedule_before_commit(self)

    def pop_outputs(self) -> list[ReqOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---------------------------------------------------------------- results
    def _apply(self, events: list[SeqEvent]) -> None:
        """`step_results.apply_events` (a method: tests and benchmarks wrap it per scheduler)."""
        apply_events(self, events)

    # ---------------------------------------------------------------- prefill
    def _free_tokens(self) -> int:
        return self.kv_pool.available() + self.cache.evictable_size()

    def _alloc_slots(self, n: int) -> torch.Tensor | None:
        short = n - self.kv_pool.available()
        if short > 0:
            self.cache.evict(short)
        return self.kv_pool.alloc(n)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        """`prefill_admission.schedule_prefill` (a method: tests and benchmarks wrap it)."""
        return schedule_prefill(self)

    def _admit(self, req: Req, prefix: torch.Tensor, ext: int) -> None:
        req.req_pool_idx = self.req_to_token_pool.alloc()
        assert req.req_pool_idx is not None
        if len(prefix):
            self.req_to_token_pool.write(req.req_pool_idx, 0, prefix)
        req.cache_protected_len = len(prefix)
        req.kv_len = len(prefix) + ext
        if not req.admitted_once:
            req.cached_tokens = len(prefix)
            req.admitted_once = True
            self.stats["prompt_tokens"] += len(req.input_ids) * (1 + len(req.followers))
            self.stats["cached_tokens"] += len(prefix)

    def _peek_prefix_len(self, req: Req) -> int:
        return self.cache.peek(req.fill_slice(0, req.max_prefix_len), req.cache_namespace)

    def _add(self, batch: ScheduledBatch, req: Req, slots: torch.Tensor, decoding: bool = False) -> None:
        assert req.req_pool_idx is not None
        batch.add(req, slots, decoding)
        req.kv_len += int(slots.numel())

    # ---------------------------------------------------------------- decode
    def _schedule_decode(self, mixed: bool = False) -> ScheduledBatch | None:
        """`decode_schedule.schedule_decode` (a method: tests and benchmarks wrap it)."""
        return schedule_decode(self, mixed)

    # ---------------------------------------------------------------- finishing
    def _release_kv(self, req: Req) -> None:
        if req.req_pool_idx is None:
            return
        self.cache.release(req)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    def _finish(self, req: Req, reason: FinishReason) -> None:
        req.finished_reason = reason
        if self.spec is not None:
            self.spec.forget(req)
        if self.grammars is not None and req.grammar is not None:
            self.grammars.forget(req)  # the runtime keeps no finished request (nor its matcher)
        self._release_kv(req)
        for follower in req.followers:  # followers that never started finish with their leader
            if not follower.finished:
                self._finish(follower, reason)
        req.followers = []
        self.outputs.append(req.take_output())

    def record_generated(self, n: int) -> None:
        self.stats["generated_tokens"] += n
        rate = self.gen_rate.add(time.monotonic(), n)
        if rate is not None:
            self.stats["last_gen_throughput"] = rate
