"""The scheduler's side of constrained decoding: compile off the loop, mask, advance, jump forward.

Per decode step the host commits every constrained row's sampled token and fills every row's next
mask. Both run for the whole batch at once on worker threads with the GIL released
(constrained/mask_workers.py), and the masks are started right after the commit, in the
background: the step that samples next almost always samples exactly these requests. In an
overlapped step the scheduler samples right after this commit and does the rest of its per-request
work (appends, finish checks, outputs) after the launch. A request whose state changed since
(jump-forward) or that was not committed (just prefilled) gets its row computed when the masks are
taken.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from radixlm.runtime.grammar_rides import GrammarRides
from radixlm.runtime.grammar_tables import DeviceTables, TableStep
from radixlm.runtime.request import Req
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class MaskPrefetch:
    """Masks being computed in the background for the requests of the last commit."""

    rows: dict[int, tuple[Req, Any, int]]  # id(req) -> (req, its matcher then, row of `buffer`)
    buffer: torch.Tensor | None  # None: only a state table's missing rows were filled
    done: Future[None]


class GrammarRuntime(GrammarRides):
    def __init__(self, args: ServerArgs, tokenizer: Any, tokenizer_path: str, vocab_size: int) -> None:
        from radixlm.constrained.service import GrammarService

        if tokenizer is None:
            raise ValueError("constrained decoding needs a tokenizer (not available with --skip-tokenizer-init)")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        logger.info("first constrained request: preparing the %s grammar backend's view of the tokenizer",
                    args.grammar_backend)
        from radixlm.constrained.mask_workers import GPU_DEFAULT_THREADS, MaskWorkers, default_mask_threads

        threads = args.grammar_mask_threads
        if threads is None:
            threads = default_mask_threads(GPU_DEFAULT_THREADS) if torch.cuda.is_available() else 0
        # grammars reach `poll` built for every mask thread's matcher family (off the scheduler's thread)
        self.service = GrammarService(tokenizer_path, tokenizer=tokenizer, backend=args.grammar_backend,
                                      timeout_s=args.grammar_compile_timeout, families=max(1, threads))
        self.pending: dict[int, Req] = {}
        self.workers = MaskWorkers(threads)
        self._families_ready = self._prepare_families(threads)
        self.width = (vocab_size + 31) // 32
        self.pin = torch.cuda.is_available()  # masks go to the device from pinned memory, asynchronously
        self._prefetch: MaskPrefetch | None = None
        self._terminated: dict[int, tuple[Req, bool]] = {}  # after the last commit, per request
        self._step: TableStep | None = None  # the last commit's table rows, until the next gather or change
        self._rows_of: tuple[TableStep, dict[int, int]] | None = None  # a step's row per request (`ride_after`)
        self._families_made = 0
        self.state_tables = args.grammar_state_table != "off"
        self.forced_rows = args.enable_forced_rows  # tables learn, and completions walk, forced pairs (forced_rows.py)
        self._tables = DeviceTables()
        self._completion: Any = None  # tables' rows filled ahead of use in a background process
        if args.grammar_state_table == "complete" or (args.grammar_state_table == "auto" and torch.cuda.is_available()):
            from radixlm.constrained.table_completion import TableCompletion

            self._completion = TableCompletion(tokenizer_path, self.service.info.fingerprint)
            self._completion.start()  # its tokenizer loads while the first grammar compiles

    def _prepare_families(self, threads: int) -> threading.Thread | None:
        """One matcher family per mask thread; what a backend shares between a family's matchers
        (llguidance: a tokenizer copy) is built on a background thread while the first grammar
        compiles, so that no decode step waits for it."""
        from radixlm.constrained.compiler import backend_module

        prepare = getattr(backend_module(self.service.backend), "prepare_families", None)
        if prepare is None or threads < 2:
            return None
        thread = threading.Thread(target=prepare, args=(self.service.info, threads), daemon=True,
                                  name="grammar-families")
        thread.start()
        return thread

    def submit(self, req: Req) -> None:
        """Queue the request's grammar; a spec in the compile service's cache (served before) gets its
        matchers now, nothing queued or polled: no round trip through the next poll for item (f)'s
        256 requests of one schema."""
        constraint = req.params.constraint
        assert constraint is not None
        kind, spec = constraint
        compiled = self.service.submit(id(req), {kind: spec})
        if compiled is not None:
            self._attach(req, self._prepared(compiled, {}))
            return
        req.grammar_pending = True
        self.pending[id(req)] = req

    def file_completed_rows(self) -> None:
        """File what a table's background completion sent since (rows, then its DFA moves a slice at a
        time), mask work settled first. The scheduler calls this right after launching a forward pass
        (or when it has none to launch): a chunk costs the host a few ms, which there the device's
        forward hides, where before the launch the device would wait for it. The rows filed are sent to
        the tables' device copies here too."""
        if self._completion is not None and self._completion.has_news():
            self._settle()
            if self._completion.poll():
                self._tables.refresh()  # the rows filed go to the device now, not at the next gather

    def poll(self) -> list[tuple[Req, Exception | None]]:
        """Requests whose grammar finished compiling since the last step (with the error, if any)."""
        done = []
        ready: dict[int, Any] = {}  # id(compiled) -> it with its table and families: once per grammar a poll
        for key, result in self.service.poll():
            req = self.pending.pop(key, None)
            if req is None:
                continue
            req.grammar_pending = False
            if isinstance(result, Exception):
                done.append((req, result))
                continue
            self._attach(req, self._prepared(result, ready))
            done.append((req, None))
        return done

    def _prepared(self, compiled: Any, seen: dict[int, Any]) -> Any:
        """`compiled` with its table and every mask thread's matcher family, made once per grammar (and
        tokenizer); `seen`: the grammars readied since the caller's start, by id (a poll's)."""
        grammar = seen.get(id(compiled))
        if grammar is None:
            if self._families_ready is not None:
                self._families_ready.join()
                self._families_ready = None
            grammar = seen[id(compiled)] = self._with_table(compiled)
            grammar.prepare_families(max(1, self.workers.threads))  # (a no-op once built)
        return grammar

    def _attach(self, req: Req, grammar: Any) -> None:
        """The request's matchers (its followers' too), one family after another."""
        req.grammar = grammar.matcher(self._family())
        for follower in req.followers:
            follower.grammar = grammar.matcher(self._family())

    def _with_table(self, grammar: Any) -> Any:
        """The grammar with a per-state mask table where its language allows one (one table per
        compiled grammar, shared by all its requests), else the grammar itself."""
        if not self.state_tables:
            return grammar
        from radixlm.constrained.table_grammar import TableGrammar

        def wrap() -> Any:
            wrapped = TableGrammar.wrap(grammar)
            if wrapped is not None:
                wrapped.table.learn_pairs = self.forced_rows
            if wrapped is not None and self._completion is not None:
                self._completion.submit(wrapped.table, grammar.backend, grammar.payload(), pairs=self.forced_rows)
            return wrapped

        return self._tables.grammar(grammar, wrap)

    def _family(self) -> int:
        """Round-robin over one matcher family per mask thread: rows filled in parallel then
        mostly belong to different families (no shared lexer cache between threads)."""
        self._families_made += 1
        return self._families_made % max(1, self.workers.threads)

    def info(self) -> dict[str, int]:
        """For get_server_info: state tables still being completed in the background (a benchmark that
        means to time a server that has served its schema waits for 0)."""
        return {"grammar_tables_completing": self._completion.pending if self._completion is not None else 0}

    def forget(self, req: Req) -> None:
        """An aborted request: nothing here keeps it (or its matcher) any longer. A mask being
        computed for it in the background finishes into a row nobody takes."""
        self._step = None
        self.pending.pop(id(req), None)
        self._terminated.pop(id(req), None)
        if self._prefetch is not None:
            self._prefetch.rows.pop(id(req), None)

    def bitmask(self, reqs: list[Req], device: torch.device) -> torch.Tensor:
        """[B, W] int32 on `device`: each constrained row its matcher's mask, others all-allowed.
        Rows prefetched after the last commit are taken as they are; the rest are filled now."""
        prefetch, self._prefetch = self._prefetch, None
        step, self._step = self._step, None
        if prefetch is not None:
            prefetch.done.result()
        gathered = self._tables.gather(reqs, device, self.workers, step)  # rows of one state table: a gather
        if gathered is not None:
            return gathered
        src: list[int] = []
        dst: list[int] = []
        allowed: list[int] = []
        missing: list[tuple[Any, int]] = []
        hits = prefetch.rows if prefetch is not None else {}
        for i, req in enumerate(reqs):
            if req.grammar is None or req.finished:  # finished meanwhile (overlap): its token is dropped
                allowed.append(i)
                continue
            hit = hits.get(id(req))
            if hit is not None and hit[0] is req and hit[1] is req.grammar:
                src.append(hit[2])
                dst.append(i)
            else:
                missing.append((req.grammar, i))
        if prefetch is not None and prefetch.buffer is not None and len(dst) == len(reqs) == prefetch.buffer.shape[0] \
                and src == dst:
            mask = prefetch.buffer  # the usual decode step: the same requests, in the same order
        else:
            mask = torch.empty((len(reqs), self.width), dtype=torch.int32, pin_memory=self.pin)
            if dst:
                mask[dst] = prefetch.buffer[src]  # type: ignore[union-attr]
            if allowed:
                mask[allowed] = -1
            if missing:
                self.workers.fill(missing, mask)
        return mask.to(device, non_blocking=True) if device.type == "cuda" else mask

    def advance_many(self, reqs: list[Req], tokens: list[int], forced_min_tokens: int = 0,
                     rides: list[list[int]] | None = None) -> set[int]:
        """Commit one sampled token per request (all matchers at once), then start their next
        masks in the background. Until those are taken (`bitmask`) or awaited, nothing else may
        touch these matchers: `is_terminated` answers from what was recorded here.

        `forced_min_tokens` > 0: also returns the ids of the live requests whose grammar now forces
        text of at least that many tokens (a jump-forward candidate), read before the masks start.
        The caller asks only where a jump could pay (small batches), so large batches pay no
        per-row forced-prefix call; only rows forcing that many bytes are tokenized.

        `rides`: per request the grammar-forced tokens that follow its token (`forced_rows.plan_rides`, read when
        that token's mask was taken), committed right after it."""
        self._settle()
        self._step = None
        step = self._tables.commit(reqs, tokens, self.workers) if self.state_tables else None
        if step is not None:
            ok, finished = step.ok, step.done
        else:
            ok = self.workers.advance([r.grammar for r in reqs], tokens)
            finished = [not good or req.grammar.is_terminated() for req, good in zip(reqs, ok)]
        if rides is not None:
            ok, finished = list(ok), list(finished)
            for j, ride in enumerate(rides):
                if ride and ok[j] and not finished[j]:
                    ok[j], finished[j] = self._ride(reqs[j], ride, step, j)
        self._terminated.clear()
        live: list[Req] = []
        due: set[int] = set()
        for req, token, good, done in zip(reqs, tokens, ok, finished):
            if not good:
                # The mask forbids this, so it means a bug (or an EOS the grammar refuses): stop cleanly.
                logger.error("grammar rejected sampled token %d for request %s", token, req.rid)
                req.grammar_failed = True
                done = True
            self._terminated[id(req)] = (req, done)
            if not done:
                live.append(req)
                if forced_min_tokens > 0 and self._forces(req, forced_min_tokens):
                    due.add(id(req))
        if step is not None and not step.table.broken and -1 not in step.rows:
            self._step = step  # the next gather of these requests takes their rows from it
            job = step.table.fill_missing(step.missing, self.workers) if step.missing else None
        else:
            job = self._tables.fill_missing(live, self.workers) if live else False
        if job:  # rows of one state table: only the states no row stood at before are filled
            self._prefetch = MaskPrefetch({}, None, self.workers.start(job))
        elif job is False and self.workers.threads > 0:
            buffer = torch.empty((len(live), self.width), dtype=torch.int32, pin_memory=self.pin)
            items = [(r.grammar, i) for i, r in enumerate(live)]
            self._prefetch = MaskPrefetch({id(r): (r, r.grammar, i) for i, r in enumerate(live)}, buffer,
                                          self.workers.start_fill(items, buffer))
        return due

    def _forces(self, req: Req, min_tokens: int) -> bool:
        """The grammar forces text of at least `min_tokens` tokens (a token holds at least one byte)."""
        if len(req.grammar.forced_bytes()) < min_tokens:
            return False
        forced = req.grammar.forced_prefix()
        return len(self.tokenizer.encode(forced, add_special_tokens=False)) >= min_tokens

    def check_drafts(self, req: Req, drafts: list[int]) -> tuple[list[int], torch.Tensor]:
        """Speculative decoding: the longest prefix of `drafts` the grammar allows, and the masks of
        the positions to verify ([len(kept) + 1, W] int32: after 0, 1, ... kept drafts). The matcher
        walks the drafts and rolls back: its state is unchanged."""
        self._step = None
        self._settle()
        grammar = req.grammar
        masks = torch.empty((len(drafts) + 1, self.width), dtype=torch.int32)
        kept = 0
        grammar.fill_next_token_bitmask(masks, 0)
        for tid in drafts:
            if not grammar.advance(tid):
                break
            kept += 1
            if grammar.is_terminated():  # the request ends at this token: nothing after it is verified
                masks[kept] = -1
                break
            grammar.fill_next_token_bitmask(masks, kept)
        grammar.rollback(kept)
        return drafts[:kept], masks[: kept + 1]

    def advance_one(self, req: Req, token: int) -> None:
        """Commit one token of a verified run (tokens are appended one by one, each checked for a
        finish); `is_terminated` then answers for the state after it."""
        self._step = None
        self._settle()
        good = req.grammar.advance(token)
        if not good:
            logger.error("grammar rejected verified token %d for request %s", token, req.rid)
            req.grammar_failed = True
        self._terminated[id(req)] = (req, not good or req.grammar.is_terminated())
        if self._prefetch is not None:
            self._prefetch.rows.pop(id(req), None)

    def _settle(self) -> None:
        """Wait for background mask work: after this the matchers are the caller's again."""
        if self._prefetch is not None:
            self._prefetch.done.result()

    def is_terminated(self, req: Req) -> bool:
        if getattr(req, "grammar_failed", False):
            return True
        recorded = self._terminated.get(id(req))
        if recorded is not None and recorded[0] is req:
            return recorded[1]
        self._settle()
        return req.grammar.is_terminated()

    def jump_forward(self, req: Req, allow_retokenize: bool, min_tokens: int = 1) -> int:
        """Append the text the grammar forces (e.g. `", "name": "` in a JSON object) without a model
        step per token. The boundary is re-tokenized with the last output token when that token was
        not sent to the client yet, so the model sees natural tokens. Returns tokens added (net)."""
        self._step = None
        self._settle()
        forced = req.grammar.forced_prefix()
        if not forced or len(forced.encode()) < min_tokens:  # a token holds at least one byte
            return 0
        room = req.params.max_new_tokens - len(req.output_ids) - 1
        if room <= 0:
            return 0
        k = 1 if allow_retokenize and req.output_ids and len(req.output_ids) > req.sent_output_len else 0
        tail = self.tokenizer.decode(req.output_ids[-k:]) if k else ""
        new_ids = self.tokenizer.encode(tail + forced, add_special_tokens=False)
        if k and (not new_ids or self.tokenizer.decode(new_ids) != tail + forced):
            return 0
        if len(new_ids) - k < min_tokens or len(new_ids) - k > room:
            return 0
        grammar = req.grammar
        if k:
            grammar.rollback(k)
        accepted = 0
        for tid in new_ids:
            if not grammar.advance(tid):
                break
            accepted += 1
        if accepted < len(new_ids):  # not a valid path: restore the previous state exactly
            grammar.rollback(accepted)
            for tid in req.output_ids[len(req.output_ids) - k :]:
                grammar.advance(tid)
            return 0
        if k:
            del req.output_ids[-k:]
        req.output_ids.extend(new_ids)
        self._terminated.pop(id(req), None)  # its recorded state and prefetched mask are stale now
        if self._prefetch is not None:
            self._prefetch.rows.pop(id(req), None)
        added = len(new_ids) - k
        req.forced_tokens += added
        return added

    def close(self) -> None:
        try:
            self._settle()
        finally:
            self.workers.close()
            self.service.close()
            if self._completion is not None:
                self._completion.close()
