"""The front half of the runtime (HTTP/tokenizer process): tokenize, send to the scheduler,
detokenize its deltas, and hand callers one typed `SequenceDelta` per sequence and update, which
each edge (native API, OpenAI API, `Engine`) renders in its own shape.

The scheduler processes behind it (one, or N data-parallel replicas of TP x PP ranks each) are a
`ReplicaSet` (runtime/parallel/): it starts, watches and stops them, routes each request and fans
out control messages. This object keeps tokenization and the state of every request."""
from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from radixlm.runtime.detokenizer import IncrementalDetokenizer, stop_holdback, trim_at_stop
from radixlm.runtime.front_work import FrontWork
from radixlm.runtime.generate_request import GenerateItem, GenerateRequest
from radixlm.runtime.io_struct import AbortReq, ControlResp, ReqOutput, SchedulerReady, TokenizedGenerateReq, sequence_rids
from radixlm.runtime.parallel.launch import Replica
from radixlm.runtime.parallel.replica_set import ReplicaSet, SchedulerDiedError
from radixlm.runtime.request_log import RequestLog
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.scheduler_process import load_tokenizer
from radixlm.runtime.sequence_output import LogprobDelta, SequenceDelta, TokenLogprob, common_prefix_len
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.stop_regex import regex_holdback, trim_at_first_match
from radixlm.runtime.top_rows import expand

logger = logging.getLogger(__name__)

__all__ = ["ReqState", "SchedulerDiedError", "TokenizerManager"]


@dataclass
class ReqState:
    item: GenerateItem
    rid: str
    index: int
    prompt_ids: list[int]
    detok: IncrementalDetokenizer
    created: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    last: ReqOutput | None = None
    finished: bool = False
    input_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    replica: int = 0  # the data-parallel replica serving it
    error: str | None = None  # set when that replica died before it finished
    # what the caller has been handed: the visible text, token ids, entries of the four logprob lists
    shown: str = ""
    ids_sent: int = 0
    logprobs_sent: list[int] = field(default_factory=lambda: [0, 0, 0, 0])


class TokenizerManager:
    def __init__(self, args: ServerArgs) -> None:
        from radixlm.runtime.model_source import resolve_model_path

        self.args = args
        self.model_dir = resolve_model_path(args.model_path, revision=args.revision, download_dir=args.download_dir)
        # --skip-tokenizer-init: clients send input_ids and read output_ids (random-weight benchmarks).
        self.tokenizer: Any = None if args.skip_tokenizer_init else load_tokenizer(args.tokenizer_path or self.model_dir)
        self.replicas = ReplicaSet(args, self.model_dir)
        atexit.register(self.shutdown)  # before multiprocessing's own exit hook joins the children
        self.states: dict[str, ReqState] = {}
        self.request_log = RequestLog(args.log_requests_level) if args.log_requests else None
        # LoRA adapters requests may name -> their folder (--lora-paths, then /load_lora_adapter)
        self.lora_adapters: dict[str, str] = args.lora_adapters() if args.enable_lora else {}
        self.work = FrontWork()  # a large request's tokenization and parsing, off the event loop

    @property
    def info(self) -> SchedulerReady:
        """The limits requests are validated against (the smallest replica's)."""
        return self.replicas.info

    @property
    def dead(self) -> str | None:
        """Why nothing serves any more (every replica is gone), or None."""
        return self.replicas.dead

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop that will await results (the replicas' outputs arrive on it)."""
        self.replicas.start(loop, self._on_outputs, self._on_replica_death)

    # ---------------------------------------------------------------- scheduler -> here
    def _on_outputs(self, outputs: list[ReqOutput]) -> None:
        for out in outputs:
            state = self.states.get(out.rid)
            if state is None:
                continue
            self._apply(state, out)
            if state.finished:
                self.replicas[state.replica].open_sequences -= 1
                if self.request_log is not None:
                    self.request_log.finished(state)
            state.event.set()

    def _apply(self, state: ReqState, out: ReqOutput) -> None:
        state.output_ids.extend(out.output_ids)
        finished = out.finished_reason is not None
        state.detok.add(out.output_ids, final=finished)
        state.last = out
        for name in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs"):
            delta = getattr(out, name)
            if delta:
                getattr(state, name).extend(delta)
        if out.input_top_logprobs:  # a prefill chunk's top-k comes as arrays: the lists are made here, off the loop
            state.input_top_logprobs.extend(expand(out.input_top_logprobs))
        state.finished = finished

    def _on_replica_death(self, replica: Replica) -> None:
        """Fail the unfinished requests of a replica whose scheduler is gone."""
        for state in self.states.values():
            if state.replica == replica.index and not state.finished:
                state.error = replica.dead
                state.event.set()

    # ---------------------------------------------------------------- caller API
    def tokenize(self, item: GenerateItem) -> list[int]:
        if item.input_ids is not None:
            return list(item.input_ids)
        assert item.text is not None
        if self.tokenizer is None:
            raise InvalidRequestError("text", "this server runs with --skip-tokenizer-init; send input_ids")
        return self.tokenizer.encode(item.text, add_special_tokens=False)

    def nonempty_prompt(self, prompt_ids: list[int], item: GenerateItem) -> list[int]:
        """Zero prompt tokens is a 400, as in vLLM and OpenAI: there is no position to predict from.
        The exception: max_new_tokens 0 with a BOS token, which then is the (scored) prompt."""
        if prompt_ids:
            return prompt_ids
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if item.params.max_new_tokens == 0 and isinstance(bos, int):
            return [bos]
        raise InvalidRequestError(item.prompt_field, "prompt is empty")

    def validate_length(self, prompt_ids: list[int], item: GenerateItem) -> None:
        """SGLang's rule: a prompt must leave room for a token; an explicit max_new_tokens beyond
        what the context leaves is a 400, the default one is trimmed to fit by the scheduler."""
        ctx = self.info.context_len
        if len(prompt_ids) >= ctx:
            raise InvalidRequestError(item.prompt_field,
                                      f"the prompt has {len(prompt_ids)} tokens; this model's context is {ctx}")
        if item.max_new_tokens_given and len(prompt_ids) + item.params.max_new_tokens > ctx:
            raise InvalidRequestError(item.error_field("max_new_tokens"),
                                      f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({item.params.max_new_tokens}) "
                                      f"exceeds the context length {ctx}")
        need = (len(prompt_ids) + 1) * (1 if self.args.disable_radix_cache is False else item.params.n)
        if need > self.info.max_total_tokens:
            raise InvalidRequestError(item.prompt_field,
                                      f"the prompt needs {need} KV slots; the pool has {self.info.max_total_tokens}")

    def prepare(self, req: GenerateRequest) -> list[tuple[GenerateItem, list[int]]]:
        """Every item tokenized and checked (400s); reads only, so it may run on a worker thread."""
        prepared = []
        for item in req.items:
            self.check_adapter(item.lora_path, item.lora_field)
            ids = self.nonempty_prompt(self.tokenize(item), item)
            self.validate_length(ids, item)
            prepared.append((item, ids))
        return prepared

    def submit(self, req: GenerateRequest, prepared: list[tuple[GenerateItem, list[int]]] | None = None
               ) -> list[ReqState]:
        """Send every item (tokenized here unless `prepared`); returns one state per output (n per item)."""
        if prepared is None:
            prepared = self.prepare(req)
        states: list[ReqState] = []
        try:
            self._register_and_send(req, prepared, states)
        except Exception:  # e.g. a duplicate rid in a later item, a dead replica: forget what was registered
            self.abort(states)
            raise
        return states

    def _register_and_send(self, req: GenerateRequest, prepared: list[tuple[GenerateItem, list[int]]],
                           states: list[ReqState]) -> None:
        outgoing: dict[int, list[TokenizedGenerateReq]] = {}  # per replica: one message for the batch
        for item, ids in prepared:
            n = item.params.n
            rids = sequence_rids(item.rid, n)
            for rid in rids:
                if rid in self.states:
                    raise InvalidRequestError(item.rid_field, f"request id {rid!r} is already in use")
            replica = self.replicas.route(ids, item.extra_key if item.lora_path is None else
                                          f"lora:{item.lora_path}\x00{item.extra_key or ''}")
            for rid in rids:
                detok = IncrementalDetokenizer(self.tokenizer, item.params.skip_special_tokens,
                                               item.params.spaces_between_special_tokens)
                state = ReqState(item=item, rid=rid, index=len(states), prompt_ids=ids, detok=detok,
                                 replica=replica.index)
                self.states[rid] = state
                states.append(state)
            replica.open_sequences += n
            outgoing.setdefault(replica.index, []).append(TokenizedGenerateReq(
                rid=item.rid, input_ids=ids, params=item.params, return_logprob=item.return_logprob,
                logprob_start_len=item.logprob_start_len, top_logprobs_num=item.top_logprobs_num,
                stream=req.stream, extra_key=item.extra_key, lora_path=item.lora_path,
            ))
        for index, msgs in outgoing.items():
            self.replicas.send(msgs, self.replicas[index])

    def abort(self, states: list[ReqState]) -> None:
        for item_rid, replica in {(s.item.rid, s.replica) for s in states if not s.finished and not s.error}:
            try:
                self.replicas.send(AbortReq(item_rid), self.replicas[replica])
            except (SchedulerDiedError, OSError):
                pass
        for s in states:
            if self.states.pop(s.rid, None) is not None and not s.finished and not s.error:
                self.replicas[s.replica].open_sequences -= 1

    def abort_request(self, rid: str | None, message: str = "aborted by client") -> int:
        """Ask the scheduler to abort a request by id (a request's rid or one of its n sequences'),
        or every unfinished one for None; their generators then finish with an abort reason.
        Returns the number of unfinished sequences targeted."""
        targets = [s for s in self.states.values() if not s.finished and not s.error
                   and (rid is None or rid in (s.rid, s.item.rid))]
        per_replica: dict[int, dict[str, None]] = {}  # (abort_all: one message a replica, its aborts in one list)
        for s in targets:
            per_replica.setdefault(s.replica, {})[rid if rid is not None else s.item.rid] = None
        for replica, rids in per_replica.items():
            self.replicas.send([AbortReq(r, message) for r in rids], self.replicas[replica])
        return len(targets)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[list[SequenceDelta]]:
        """Yields, per update, a delta of each sequence that changed (streaming) or, once, of all. A long
        prompt is tokenized on a worker thread (front_work.py), the loop serving other clients meanwhile."""
        size = sum(len(item.text or "") + len(item.input_ids or ()) for item in req.items)
        states = self.submit(req, await self.work.run(size, self.prepare, req))
        try:
            if not req.stream:
                for s in states:
                    await self._wait(s, until_finished=True)
                yield [self.delta(s) for s in states]
                return
            pending = set(range(len(states)))
            while pending:
                waiters = [asyncio.ensure_future(self._wait(states[i], until_finished=False)) for i in pending]
                try:
                    done, rest = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:  # (also when the client is gone: pending waiters were logged as destroyed tasks)
                    for w in waiters:
                        if not w.done():
                            w.cancel()
                for w in done:
                    w.exception()  # mark retrieved: a dead scheduler is reported by delta() below
                changed = []
                for i in sorted(pending):
                    s = states[i]
                    if s.event.is_set():
                        s.event.clear()
                        changed.append(self.delta(s))
                        if s.finished or s.error or self.dead:
                            pending.discard(i)
                if changed:
                    yield changed
        finally:
            self.abort(states)

    async def _wait(self, state: ReqState, until_finished: bool) -> None:
        while True:
            if state.error or self.dead:
                raise SchedulerDiedError(state.error or self.dead)
            if state.finished or (not until_finished and state.event.is_set()):
                return
            state.event.clear()
            await state.event.wait()

    def delta(self, s: ReqState) -> SequenceDelta:
        """What `s` has to tell since its previous delta."""
        if (s.error or self.dead) and not s.finished:
            raise SchedulerDiedError(s.error or self.dead)
        out = s.last
        reason = out.finished_reason if out else None
        visible = self._visible_text(s)
        start = common_prefix_len(s.shown, visible)
        s.shown = visible
        new_ids = s.output_ids[s.ids_sent:]
        s.ids_sent = len(s.output_ids)
        return SequenceDelta(
            index=s.index, rid=s.rid, text=visible[start:], text_start=start, output_ids=new_ids,
            prompt_tokens=len(s.prompt_ids), completion_tokens=len(s.output_ids),
            cached_tokens=out.cached_tokens if out else 0,
            forced_tokens=out.forced_tokens if out else 0, num_retractions=out.num_retractions if out else 0,
            spec_verify_ct=out.spec_verify_ct if out else None,
            spec_accepted_tokens=out.spec_accepted_tokens if out else None,
            logprobs=self._logprob_delta(s) if s.item.return_logprob else None,
            finish=reason, e2e_latency=time.monotonic() - s.created if reason is not None else None,
        )

    def _visible_text(self, s: ReqState) -> str:
        """The output text a caller may see now: trimmed at the stop that finished it (unless
        no_stop_trim), and while unfinished without what could still grow into a stop string or regex."""
        reason = s.last.finished_reason if s.last else None
        params = s.item.params
        text = s.detok.text
        ids = s.output_ids
        if reason is not None and not params.no_stop_trim and reason.kind == "stop":
            matched = reason.matched
            if reason.regex:
                text = trim_at_first_match(text, params.stop_regex)
            elif isinstance(matched, str):
                text = trim_at_stop(text, matched)
            elif isinstance(matched, int) and ids and ids[-1] == matched and matched in params.stop_token_ids:
                text = s.detok._decode(ids[:-1])
        elif reason is None and (params.stop or params.stop_regex):
            held = max(stop_holdback(text, params.stop), regex_holdback(text, params.stop_regex) if params.stop_regex else 0)
            text = text[: len(text) - held]
        return text

    def _logprob_delta(self, s: ReqState) -> LogprobDelta:
        dec = self.tokenizer.decode if s.item.return_text_in_logprobs and self.tokenizer is not None else None

        def entry(lp: float | None, tid: int) -> TokenLogprob:
            return TokenLogprob(lp, tid, dec([tid]) if dec else None)

        lists = (s.input_token_logprobs, s.output_token_logprobs, s.input_top_logprobs, s.output_top_logprobs)
        new = [lst[sent:] for lst, sent in zip(lists, s.logprobs_sent)]
        s.logprobs_sent = [len(lst) for lst in lists]
        tops = s.item.top_logprobs_num > 0
        return LogprobDelta(
            input_tokens=[entry(lp, t) for lp, t in new[0]],
            output_tokens=[entry(lp, t) for lp, t in new[1]],
            input_top=[None if e is None else [entry(lp, t) for lp, t in e] for e in new[2]] if tops else None,
            output_top=[[entry(lp, t) for lp, t in e] for e in new[3]] if tops else None,
        )

    async def control(self, kind: str, timeout: float = 30.0, payload: dict | None = None) -> ControlResp:
        return await self.replicas.control(kind, timeout, payload)

    # ---------------------------------------------------------------- LoRA adapters
    def check_adapter(self, name: str | None, where: str = "lora_path") -> None:
        """A request may name only a loaded adapter (400 naming the field and the adapter otherwise)."""
        if name is None:
            return
        if not self.args.enable_lora:
            raise InvalidRequestError(where, f"LoRA adapter {name!r} requested, but this server runs without "
                                             "LoRA (start it with --enable-lora or --lora-paths)")
        if name not in self.lora_adapters:
            loaded = ", ".join(sorted(self.lora_adapters)) or "none"
            raise InvalidRequestError(where, f"unknown LoRA adapter {name!r} (loaded: {loaded})")

    async def load_lora_adapter(self, name: str, path: str) -> ControlResp:
        resp = await self.control("load_lora_adapter", 120.0, {"lora_name": name, "lora_path": path})
        if resp.ok:
            self.lora_adapters[name] = path
        return resp

    async def unload_lora_adapter(self, name: str) -> ControlResp:
        resp = await self.control("unload_lora_adapter", 30.0, {"lora_name": name})
        if resp.ok:
            self.lora_adapters.pop(name, None)
        return resp

    def shutdown(self) -> None:
        self.work.shutdown()
        self.replicas.shutdown()
