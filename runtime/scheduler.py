"""The scheduler: continuous batching with chunked prefill, prefix reuse, retraction and abort.

Each step: take in new messages -> schedule a batch -> launch it -> process its results. Outputs go
back to the tokenizer process as ReqOutput deltas.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from radixlm.runtime.decode_log import DecodeLog
from radixlm.runtime.fault_isolation import recover_from_step_error
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.gen_rate import GenRate
from radixlm.runtime.io_struct import AbortReq, ControlReq, ControlResp, FinishReason, ReqOutput, TokenizedGenerateReq
from radixlm.runtime.lora.admission import AdapterDemand, SlotBudget, WaitingQueue, longest_first, may_admit_any, next_swap_in, slot_bound
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.prefix_cache import NoPrefixCache, PrefixCache, RadixPrefixCache
from radixlm.runtime.request import Req
from radixlm.runtime.result_processor import ResultProcessor, SeqEvent
from radixlm.runtime.schedule_batch import ScheduledBatch, UncommittedStep
from radixlm.runtime.schedule_policy import DecodeReserve, InBatchPrefixes, order_waiting
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.speculative.spec_decoder import Drafts, SpecDecoder, prepare_draft_model
from radixlm.runtime.speculative.tree_kv import TreeKV

logger = logging.getLogger(__name__)

# A prefill batch this small carries the running requests' decode rows (see _should_mix) while their
# KV is at most MIX_MAX_DECODE_KV_TOKENS tokens in all.
MIX_ALWAYS_MAX_TOKENS = 256
MIX_MAX_DECODE_KV_TOKENS = 131072
# A prefill step of at least this many requests is overlapped (`_launch_prefill`). The host's work
# between two prefill steps grows with their requests (~0.15 ms each on the H200's host: ~20 ms for
# the ~130 short questions of a shared-prefix chunk, 11% of its forward pass), while a device never
# left idle ran its prefill steps 3.7% slower (2026-12-04 mid round, workload (e): the H200 holds
# lower clocks under continuous load; ~7 ms of an 8K chunk): even at ~45 requests a chunk, and a
# margin of 2 on that one measurement. Chunks of fewer, longer prompts ((b), (d), cache-off (e),
# (f)'s 64 prompts of 128 tokens) stay synchronous.
OVERLAP_PREFILL_MIN_REQUESTS = 96


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
                                       decode_graphs=self.runner.graph_runner is not None)
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
        # Prompts-only extend steps of many requests overlapped too: the next prefill chunk is scheduled
        # and launched before this one's first tokens are committed (not with drafts or adapters).
        self.overlap_prefill = (self.overlap and not args.disable_overlap_prefill and self.spec is None
                                and self.runner.lora is None)
        # Overlap scheduling: the decode step sampled on the device and not yet appended.
        self.uncommitted: UncommittedStep | None = None
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
                      "overlapped_prefill_steps": 0}
        self.gen_rate = GenRate()
        self.decode_log = DecodeLog(args.decode_log_interval)
        # Objects the scheduler process froze after start-up (scheduler_process.freeze_startup_heap), counted
        # there once: info() runs every --decode-log-interval decode steps, and gc.get_freeze_count() walks
        # the whole frozen heap (40-60 ms for ~300k objects on the 2-core CPU: a stall in the decode loop).
        self.frozen_objects = 0

    # ---------------------------------------------------------------- messages
    def handle(self, msg: object) -> ControlResp | None:
        if isinstance(msg, TokenizedGenerateReq):
            self._add_request(msg)
        elif isinstance(msg, AbortReq):
            self.abort(msg.rid, msg.message)
        elif isinstance(msg, ControlReq):
            return self._control(msg)
        return None

    def _add_request(self, msg: TokenizedGenerateReq) -> None:
        params = msg.params
        # Never grow past the context: the front process already rejected prompts that don't fit.
        room = self.runner.context_len - len(msg.input_ids)
        if params.max_new_tokens > room:
            params = params.replace(max_new_tokens=max(room, 0), min_new_tokens=min(params.min_new_tokens, max(room, 0)))
        base_seed = params.seed if params.seed is not None else self.rng.getrandbits(32)
        seeds = [base_seed] + [base_seed + i if params.seed is not None else self.rng.getrandbits(32)
                               for i in range(1, params.n)]
        leader = Req.group_from_wire(dataclasses.replace(msg, params=params), seeds)
        if leader.lora_name is not None and not self._bind_adapter(leader):
            return
        if self.runner.lora is not None:
            self.adapter_demand.stamp(leader)
        for seq in (leader, *leader.followers):
            seq.speculative = self.spec is not None
        if params.constraint is not None:
            self._grammar_runtime().submit(leader)
        self.waiting.append(leader)

    def _bind_adapter(self, leader: Req) -> bool:
        """Give a request naming a LoRA adapter that adapter's cache key; an adapter unloaded since
        the front checked it fails the request (400) instead."""
        lora = self.runner.lora
        uid = None if lora is None else lora.uid(leader.lora_name)
        if uid is None:
            self._finish(leader, FinishReason.abort(f"lora_path: unknown LoRA adapter {leader.lora_name!r}",
                                                    status_code=400))
            return False
        for seq in [leader, *leader.followers]:
            seq.lora_uid = uid
        return True

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

    def _control(self, msg: ControlReq) -> ControlResp:
        if msg.kind == "flush_cache":
            if not self.idle:
                return ControlResp(msg.request_id, False, {"message": "Cache not flushed: requests are running"})
            self.cache.flush()
            return ControlResp(msg.request_id, True, {"message": "Cache flushed."})
        if msg.kind == "get_info":
            return ControlResp(msg.request_id, True, self.info())
        if msg.kind in ("load_lora_adapter", "unload_lora_adapter"):
            from radixlm.runtime.lora.control import handle_lora_control

            return handle_lora_control(self, msg)
        return ControlResp(msg.request_id, False, {"message": f"unknown control {msg.kind!r}"})

    def info(self) -> dict:
        usage = self.kv_pool.usage()
        prompt = max(self.stats["prompt_tokens"], 1)
        return {
            "max_total_num_tokens": usage.total,
            "kv_free_tokens": usage.free,
            "kv_used_tokens": usage.in_use,
            "kv_cached_tokens": self.cache.cached_size(),
            "kv_evictable_tokens": self.cache.evictable_size(),
            "kv_locked_tokens": self.cache.protected_size(),
            "num_running_reqs": len(self.running) + len(self.partial),
            "num_waiting_reqs": len(self.waiting),
            "cache_hit_rate": self.stats["cached_tokens"] / prompt,
            "radix_cache_enabled": not self.args.disable_radix_cache,
            "gc_frozen_objects": self.frozen_objects,  # start-up's heap, out of the collector's reach
            **self.stats,
            **({"lora": self.runner.lora.info()} if self.runner.lora is not None else {}),
            **({"cuda_graph_capture_s": dict(self.runner.graph_runner.capture_s)}
               if self.runner.graph_runner is not None else {}),
            **(self.spec.info() if self.spec is not None else {}),
            **(self.grammars.info() if self.grammars is not None else {}),
        }

    def abort(self, rid: str, message: str) -> None:
        for queue in (self.waiting, self.running, self.partial):
            for req in [r for r in queue if rid in (r.rid, r.group_rid)]:
                queue.remove(req)
                if self.grammars is not None:
                    self.grammars.forget(req)
                self._finish(req, FinishReason.abort(message))

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self.partial or self.uncommitted)

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
            self.spec.scheduled(batch.mode == ForwardMode.DECODE, batch.has_drafts)
        fb, slot_writes = batch.to_forward_batch(self.device, self.uncommitted, self.runner.cascade)
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
        kind = "decode_steps" if batch.mode == ForwardMode.DECODE else "mixed_steps" if any(batch.decoding) else "prefill_steps"
        self.stats[kind] += 1
        if self.overlap and self.results.can_defer(batch):
            self.stats["overlapped_steps"] += 1
            previous, self.uncommitted = self.uncommitted, None
            advanced = None
            if previous is not None and any(r.grammar is not None for r in batch.reqs):
                # Grammar masks need step k's tokens in the matchers: the matchers take them now, while
                # this step's forward pass runs, and the masks are applied as this step is sampled; the
                # rest of step k's commit (appends, finish checks, outputs) runs after the launch, as for
                # unconstrained rows (the tokens still count as on the device until then).
                reqs, ids = previous.peek_tokens()
                advanced = self.results.advance_grammars(reqs, ids, self.grammars, len(self.running), allow_jump=False)
            self.uncommitted = self._launch(batch, logits)
            if self.spec is not None:
                self.spec.warm(self.running)  # n-gram indexes, while the device runs this step
            if previous is not None:
                self._commit_step(previous, allow_jump=False, advanced=advanced)
            return True
        if (self.overlap_prefill and len(batch.reqs) >= OVERLAP_PREFILL_MIN_REQUESTS
                and self.results.can_defer_prefill(batch)):
            # The host schedules and launches the next step while the device runs this one; the
            # pending step (if any) is a prefill step too (only those let a prefill go first).
            self.stats["overlapped_prefill_steps"] += 1
            previous, self.uncommitted = self.uncommitted, None
            self.uncommitted = self._launch_prefill(batch, logits)
            if previous is not None:
                self._commit_step(previous, allow_jump=False)
            return True
        # This batch already consumes the pending step's tokens: they are committed without a jump
        # (one would rewrite them); this step's own results may jump, all its tokens being on the host.
        self._commit_step(allow_jump=False)
        self.process_results(batch, logits)
        return True

    def _launch(self, batch: ScheduledBatch, logits: torch.Tensor) -> UncommittedStep:
        """Sample on the device; the host appends these tokens a step later (`_commit_step`)."""
        return UncommittedStep.start(batch.reqs, self.results.sample(batch.reqs, logits, self.grammars,
                                                                     logits_needed_after=False))

    def _launch_prefill(self, batch: ScheduledBatch, logits: torch.Tensor) -> UncommittedStep | None:
        """A prompts-only extend step, overlapped: its KV goes into the prefix cache now (the next
        step may reuse it), its completed prompts' first tokens are sampled on the device and those
        requests run from now on with the token on the device; the host appends it a step later."""
        self._after_prefill(batch)  # (no followers here: nothing to fork)
        done = [(req, row) for req, row in zip(batch.reqs, batch.sample_rows) if row is not None and not req.finished]
        if not done:
            return None  # chunks of longer prompts only
        reqs = [req for req, _ in done]
        rows = [row for _, row in done]
        for req in reqs:
            req.input_logprobs_done = True
        rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
        step = UncommittedStep.start(reqs, self.results.sample(reqs, rows_logits, self.grammars,
                                                               logits_needed_after=False), prefill=True)
        self.running.extend(reqs)
        return step

    def process_results(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        """A synchronous step's results: KV bookkeeping, then sampling and stops, then their events."""
        forks = self._after_prefill(batch)
        self._apply(self.results.process(batch, logits, forks, self.grammars, len(self.running)))

    def _should_mix(self, batch: ScheduledBatch) -> bool:
        """Run the decode rows in this prefill's forward pass. A small extension (grammar-forced
        tokens, the tail of a chunked prompt) costs about what a separate decode step would, so it
        rides along while the decode rows' KV is small: in the extend kernel each decode row is a
        tile of one query streaming its whole context (an (e) chunk's tiles on the H200: ~0.9 ms a
        layer for 4,096 of them over 1,088 tokens), so 511 rows of ~1,100 tokens cost a mixed step
        ~100 ms against ~27 ms for the extension alone and a separate 512-row decode step (workload
        (e)'s last prefill chunk). A large prefill only with --enable-mixed-chunk."""
        if self.args.enable_mixed_chunk or self._lora_slot_bound():
            return True
        return (sum(batch.extend_lens) <= MIX_ALWAYS_MAX_TOKENS
                and sum(r.seq_len for r in self.running) <= MIX_MAX_DECODE_KV_TOKENS)

    def _lora_slot_bound(self) -> bool:
        """LoRA requests want more adapters than a batch holds, and prefill then goes in chunks of
        --lora-prefill-chunk tokens that carry the decode rows: such a run is bound by decode steps
        (a request decodes only while its adapter holds a slot), and each chunk saves one."""
        if self.runner.lora is None or not self.args.lora_prefill_chunk:
            return False
        return slot_bound(self.args.max_loras_per_batch, [*self.running, *self.partial], self.waiting)

    def _commit_step(self, step: UncommittedStep | None = None, allow_jump: bool = True,
                     advanced: set[int] | None = None) -> bool:
        """Append the tokens of an uncommitted step (by default the scheduler's own). `allow_jump=False`
        while a step that consumes these tokens is already launched; `advanced`: the grammars took them."""
        if step is None:
            step, self.uncommitted = self.uncommitted, None
        if step is None:
            return False
        reqs, ids = step.take_tokens()
        self._apply(self.results.commit(reqs, ids, self.grammars, len(self.running), allow_jump, advanced))
        return True

    def _can_schedule_before_commit(self) -> bool:
        """The next step can go ahead before the uncommitted one is committed: nothing to admit or
        extend (unless the uncommitted step is a prefill step: `_launch_prefill`), and no
        retraction needed (it would free the slots of a token on the device).

        Scheduling a prefill ahead of a decode step's commit was tried (benchmarks/RESULTS.md,
        issue 8): on workload (b) it lost 5% on the H200, its prefill steps measuring ~10% slower.
        After a prompts-only prefill step the next prefill needs none of its tokens: it goes first,
        so the host's admission work runs while the device computes (shared-prefix workloads admit
        ~130 requests a chunk: ~20 ms of host time per step that the device otherwise waits for)."""
        if self.jump_due:
            return False  # (a due jump is taken by the commit: its forced tokens need an extend step)
        after_prefill = self.uncommitted is not None and self.uncommitted.prefill
        if (self.partial or self._may_admit()) and not after_prefill:
            return False
        if self.spec is not None and self.spec.may_draft(self.running):
            return False  # drafts continue the last token: it must be on the host
        return self.kv_pool.available() >= len(self.running)

    def _may_admit(self) -> bool:
        """Some waiting request could be admitted now (with LoRA, requests whose adapter cannot get a
        device slot cannot: with many adapters they wait most of the time, and must not turn every
        decode step into a synchronous one)."""
        if self.runner.lora is None or not self.waiting:
            return bool(self.waiting)
        return may_admit_any(self.args.max_loras_per_batch, self.running, self.waiting, self.adapter_demand)

    @staticmethod
    def _lora_remaining(in_flight: list[Req]) -> dict[str, int]:
        """Per adapter in flight, the most new tokens one of its requests still has to make."""
        most: dict[str, int] = {}
        for r in in_flight:
            if r.lora_name is not None:
                most[r.lora_name] = max(most.get(r.lora_name, 0), r.remaining_new_tokens())
        return most

    def _prefetch_adapter(self) -> None:
        """Every slot is held: copy the adapter that should take the next free one to the device now
        (beside the forwards; nothing when it is the one staged already). Asked every step: the pick
        changes as the queue does (an adapter staged early, many turns ahead, took 11 of 64 swap-ins
        in a chunked replay of (b); asked each step, 60)."""
        lora = self.runner.lora
        name = next_swap_in(self.args.max_loras_per_batch, [*self.running, *self.partial], self.waiting,
                            self.adapter_demand, lora.resident())
        if name is not None:
            lora.prefetch(name)

    def pop_outputs(self) -> list[ReqOutput]:
        out, self.outputs = self.outputs, []
        return out

    # ---------------------------------------------------------------- results
    def _after_prefill(self, batch: ScheduledBatch) -> dict[Req, list[Req]]:
        """KV bookkeeping once a synchronous step ran: a prefilled chunk, or a whole prompt, goes into
        the prefix cache (shareable now, not only once the request finishes); a completed prompt's
        followers (n > 1) get its KV. Returns the followers that sample from their leader's row;
        one that finds no room for a copy (cache off) is queued to prefill on its own."""
        forks: dict[Req, list[Req]] = {}
        for req, decoding, row in zip(batch.reqs, batch.decoding, batch.sample_rows):
            if decoding or req.finished:
                continue
            if row is None or req.params.max_new_tokens > 0:
                self.cache.cache_unfinished(req)
            if row is None or not req.followers or req.params.max_new_tokens == 0:
                continue
            forks[req] = [f for f in req.followers if self._fork(req, f)]
            req.followers = []
        return forks

    def _fork(self, leader: Req, follower: Req) -> bool:
        follower.cached_tokens = leader.cached_tokens
        follower.admitted_once = True  # its prompt was counted with its leader's
        if follower.grammar is None and leader.grammar is not None:
            follower.grammar = leader.grammar.copy()
        follower.req_pool_idx = self.req_to_token_pool.alloc()
        if follower.req_pool_idx is not None and self.cache.share_prefix(leader, follower):
            return True
        if follower.req_pool_idx is not None:
            self.req_to_token_pool.free(follower.req_pool_idx)
            follower.req_pool_idx = None
        self.waiting.insert(0, follower)
        return False

    def _apply(self, events: list[SeqEvent]) -> None:
        """Move each request where its step left it: finished (KV released, final output), forced
        tokens to extend (partial), decoding (running); stream what a client may see."""
        self.record_generated(sum(e.sampled for e in events))
        self.jump_due = False  # only the latest results say whether a jump waits for a commit
        for ev in events:
            req = ev.req
            if ev.drafted:
                assert self.spec is not None
                if self.tree_kv.holds(req):
                    depth = self.tree_kv.depth(req)
                    self.tree_kv.keep(req, ev.kept)
                    self.spec.on_verified(req, ev.drafted, ev.accepted, ev.sampled, depth)
                else:
                    self._drop_unverified(req, ev.unverified)
                    self.spec.on_verified(req, ev.drafted, ev.accepted, ev.sampled)
            if ev.was_running and (ev.finished is not None or ev.jumped):
                self.running.remove(req)
            if ev.finished is not None:
                self._finish(req, ev.finished)
                continue
            if ev.jump_due:
                self.jump_due = True
            if ev.jumped:
                self.partial.append(req)  # its forced tokens need an extend step
            elif not ev.was_running:
                self.running.append(req)
            if req.stream and len(req.output_ids) - req.sent_output_len >= self.args.stream_interval:
                self.outputs.append(req.take_output())

    def _drop_unverified(self, req: Req, n: int) -> None:
        """A verify step's rejected drafts: their KV slots go back to the pool at once (never to
        the prefix cache, which only ever sees verified tokens)."""
        if n <= 0:
            return
        assert req.req_pool_idx is not None and req.kv_len - n >= req.cache_protected_len
        self.kv_pool.free(self.req_to_token_pool.slots(req.req_pool_idx, req.kv_len - n, req.kv_len))
        req.kv_len -= n

    # ---------------------------------------------------------------- prefill
    def _free_tokens(self) -> int:
        return self.kv_pool.available() + self.cache.evictable_size()

    def _alloc_slots(self, n: int) -> torch.Tensor | None:
        short = n - self.kv_pool.available()
        if short > 0:
            self.cache.evict(short)
        return self.kv_pool.alloc(n)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        if not self.partial and not self.waiting:
            return None  # the usual decode step: skip the reserve estimate, a pass over every running row
        if self.runner.lora is not None and self.waiting:
            self._prefetch_adapter()
        budget = min(self.max_prefill_tokens, self.chunk_size)
        if self.running and self._lora_slot_bound():
            budget = min(budget, self.args.lora_prefill_chunk)
        free = self._free_tokens() - self.reserve.reserve_for(self.running)
        batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
        self.step_batches.append(batch)
        for req in list(self.partial):
            ext = min(req.fill_len - req.kv_len, budget)
            slots = self._alloc_slots(ext) if ext > 0 else None
            if slots is None:
                continue
            self._add(batch, req, slots)
            budget -= ext
            free -= ext
            if req.kv_len == req.fill_len:
                self.partial.remove(req)
        if budget <= 0 or (self.runner.lora is not None and not self._may_admit()):
            # (with many adapters most steps: every waiting request needs a slot that is taken,
            # and building the slot budget over the whole queue each step cost ~1 ms of host time)
            return batch if batch.reqs else None
        candidates = [r for r in self.waiting if not r.grammar_pending]
        if not candidates:
            return batch if batch.reqs else None
        adapters = None if self.runner.lora is None else SlotBudget(
            self.args.max_loras_per_batch, [*self.running, *self.partial, *batch.reqs], candidates,
            self.adapter_demand, self.runner.lora.resident())
        if adapters is not None:  # only requests whose adapter fits this batch's device slots
            candidates = [r for r in candidates if adapters.admits(r)]
            if not candidates:
                return batch if batch.reqs else None
        ordered = order_waiting(candidates, self.args.schedule_policy, self._peek_prefix_len)
        if adapters is not None and adapters.bound:
            ordered = longest_first(ordered, self._lora_remaining([*self.running, *self.partial, *batch.reqs]))
        in_batch = None if self.args.disable_radix_cache else InBatchPrefixes()
        for req in ordered:
            # Check: room for the request's rows, its token budget, its KV slots.
            seqs = 1 + len(req.followers)
            if len(self.running) + len(self.partial) + len(batch.reqs) + seqs > self.max_running or budget <= 0:
                break
            if self.req_to_token_pool.available() < seqs:
                break
            prefix = self.cache.match(req)
            if in_batch is not None and in_batch.should_defer(req, len(prefix)):
                self.cache.unlock(req)  # next step its prefix is cached by a request admitted now
                continue
            ext = min(req.fill_len - len(prefix), budget)
            need = ext + int(min(req.remaining_new_tokens(), 4096) * self.reserve.ratio)
            need += len(req.followers) * req.fill_len
            slots = None if need > free and (batch.reqs or self.running) else self._alloc_slots(ext)
            if slots is None:
                self.cache.unlock(req)
                break
            # Commit: the step owns the new slots (fault isolation frees them), then the request
            # takes its row, its cached prefix and those slots.
            batch.add(req, slots, prefix_len=len(prefix))
            self._admit(req, prefix, ext)
            if adapters is not None:
                adapters.add(req)
            self.waiting.remove(req)
            if in_batch is not None:
                in_batch.add(req)
            budget -= ext
            free -= need
            if req.kv_len < req.fill_len:
                self.partial.append(req)
                break
        return batch if batch.reqs else None

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
        if not self.running:
            return None
        while self.kv_pool.available() + self.cache.evictable_size() < len(self.running):
            if len(self.running) == 1:
                break
            self._retract_one()
        batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
        self.step_batches.append(batch)
        # A request whose last token is on the device finishes when that is committed: nothing to run.
        todo = [r for r in self.running if r.params.max_new_tokens > len(r.output_ids) + r.tokens_on_device]
        drafts = self._drafts(todo, mixed)
        slots = self._alloc_slots(len(todo) + drafts.total)
        if slots is not None:  # the common case: one allocation for the whole batch
            parents = drafts.parents or [None] * len(todo)
            lanes = self.tree_kv.take_lanes(todo, drafts.tokens, parents, slots, lanes=not mixed) if drafts.parents else None
            batch.set_decode_rows(todo, slots, drafts.tokens, drafts.masks, parents, lanes)
            for req, ext in zip(todo, batch.extend_lens):
                req.kv_len += ext
            self.reserve.on_decode_step()
            return batch if todo else None
        for req in todo:
            slot = self._alloc_slots(1)
            if slot is not None:
                self._add(batch, req, slot, decoding=True)
                continue
            self.running.remove(req)
            if self.running or batch.reqs:
                self._retract(req)  # still short: retry once others finish
            else:
                self._finish(req, FinishReason.abort("KV cache is too small for this request; "
                                                     "raise --max-total-tokens or lower max_new_tokens"))
        self.reserve.on_decode_step()
        return batch if batch.reqs else None

    def _drafts(self, todo: list[Req], mixed: bool = False) -> Drafts:
        """Speculative decoding: the tokens each request verifies this step, if free slots hold them
        beyond one token per request (drafts never evict cached prefixes nor cause a retraction).
        Trees need a free request row per extra lane in a decode step (those that find none verify
        their first chain); in a mixed batch their verify rows are extend rows with a tree mask (no lanes)."""
        none = Drafts([[] for _ in todo], [None] * len(todo))
        if self.spec is None or not todo:
            return none
        drafts = self.spec.propose(todo, self.grammars)
        if drafts.parents and not mixed:
            drafts = drafts.within_lanes(self.req_to_token_pool.available())
        if drafts.total and self.kv_pool.available() < len(todo) + drafts.total:
            return none
        return drafts

    def _retract_one(self) -> None:
        victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
        self.running.remove(victim)
        self._retract(victim)

    def _retract(self, req: Req) -> None:
        """Preempt: give the KV back (to the prefix cache, so recompute is cheap) and requeue."""
        self._release_kv(req)
        if self.spec is not None:
            self.spec.forget(req)
        req.num_retractions += 1
        self.stats["retractions"] += 1
        self.reserve.on_retract()
        self.waiting.insert(0, req)
        logger.info("retracted request %s after %d tokens (KV pool exhausted)", req.rid, len(req.output_ids))

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
