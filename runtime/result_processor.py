"""After a forward pass: logprobs, sampling, grammar advance, stop checks, and output deltas."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import ReqOutput
from radixlm.runtime.prefix_cache import share_prompt_kv
from radixlm.runtime.request import Req
from radixlm.runtime.sampler import SampleRow, SamplingBatch, apply_logit_adjustments, sample, token_logprobs
from radixlm.runtime.schedule_batch import InflightBatch, ScheduledBatch
from radixlm.runtime.stop_regex import compile_stop_regexes

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Measured on an H200 (8B shape, batch 64): an eager mixed step ~15.7 ms vs a graph decode step
# ~5.5 ms, i.e. about two extra decode steps (benchmarks/profile_steps.py, item f).
JUMP_EAGER_EXTRA_STEPS = 2.0
JUMP_MAX_USEFUL_TOKENS = 64


class ResultProcessor:
    def __init__(self, sched: "Scheduler", tokenizer: Any) -> None:
        self.sched = sched
        self.tokenizer = tokenizer
        eos = set(sched.runner.model_config.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self.vocab_size = sched.runner.vocab_size
        self.grammars: Any = None  # GrammarRuntime, created on the first constrained request

    # ---------------------------------------------------------------- grammars
    def _grammar_runtime(self) -> Any:
        if self.grammars is None:
            from radixlm.runtime.grammar_runtime import GrammarRuntime

            path = self.sched.args.tokenizer_path or str(self.sched.model_dir)
            self.grammars = GrammarRuntime(self.sched.args, self.tokenizer, path, self.vocab_size)
        return self.grammars

    def prepare_grammar(self, req: Req) -> None:
        if req.params.constraint is not None:
            self._grammar_runtime().submit(req)

    def poll_grammars(self) -> None:
        if self.grammars is None:
            return
        for req, error in self.grammars.poll():
            if error is not None and req in self.sched.waiting:
                self.sched.waiting.remove(req)
                self.sched._finish(req, {"type": "abort", "message": str(error), "status_code": 400})

    # ---------------------------------------------------------------- results
    def process(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        sched = self.sched
        to_sample: list[tuple[Req, int, bool]] = []
        for i, req in enumerate(batch.reqs):
            if req.finished:
                continue  # its pending token (overlap), committed after this step launched, ended it
            if batch.logprob_rows[i]:
                self._input_logprobs(req, logits, batch.logprob_rows[i], batch.logprob_first_pos[i])
            row = batch.sample_rows[i]
            if row is None:
                sched.cache.cache_unfinished(req)  # a chunk of a long prompt is already shareable
                continue
            if not batch.decoding[i]:  # its prompt (or forced tokens) is now all in the KV cache
                req.input_logprobs_done = True
                if req.params.max_new_tokens == 0:
                    sched._finish(req, {"type": "length", "length": 0})
                    continue
                sched.cache.cache_unfinished(req)  # shareable now, not only once the request finishes
                for follower in req.followers:
                    if self._start_follower(req, follower):
                        to_sample.append((follower, row, False))
                req.followers = []
            to_sample.append((req, row, batch.decoding[i]))
        if to_sample:
            self._sample_and_advance(batch, to_sample, logits)

    def _start_follower(self, leader: Req, follower: Req) -> bool:
        sched = self.sched
        follower.req_pool_idx = sched.req_to_token_pool.alloc()
        follower.cached_tokens = leader.cached_tokens
        follower.admitted_once = True
        follower.input_logprobs_done = True
        follower.pending_input_logprobs = list(leader.pending_input_logprobs)
        follower.pending_input_top = list(leader.pending_input_top)
        if follower.grammar is None and leader.grammar is not None:
            follower.grammar = leader.grammar.copy()
        if follower.req_pool_idx is None or not share_prompt_kv(
            sched.cache, sched.kv_pool, sched.req_to_token_pool, leader, follower
        ):
            # No room to copy the prompt KV (cache off: admission's reservation does not outlast a
            # chunked prefill): the follower prefills on its own instead.
            if follower.req_pool_idx is not None:
                sched.req_to_token_pool.free(follower.req_pool_idx)
                follower.req_pool_idx = None
            sched.waiting.insert(0, follower)
            return False
        return True

    def _input_logprobs(self, req: Req, logits: torch.Tensor, rows: list[int], first_pos: int) -> None:
        if first_pos == 1 and req.logprob_start_len == 0 and not req.pending_input_logprobs:
            req.pending_input_logprobs.append((None, req.input_ids[0]))
            req.pending_input_top.append(None)
        targets = torch.tensor(req.input_ids[first_pos : first_pos + len(rows)], device=logits.device)
        chosen, top_vals, top_ids = token_logprobs(logits[rows], targets, req.top_logprobs_num)
        req.pending_input_logprobs.extend(zip(chosen.tolist(), targets.tolist()))
        if top_vals is not None and top_ids is not None:
            req.pending_input_top.extend([list(zip(v, t)) for v, t in zip(top_vals.tolist(), top_ids.tolist())])
        else:
            req.pending_input_top.extend([None] * len(rows))

    def _sample_and_advance(self, batch: ScheduledBatch, items: list[tuple[Req, int, bool]], logits: torch.Tensor) -> None:
        reqs = [r for r, _, _ in items]
        rows = [row for _, row, _ in items]
        rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
        next_ids = self._sample(reqs, rows_logits)
        lp_map = self._output_logprobs(reqs, rows_logits, next_ids)
        self._commit(reqs, next_ids.tolist(), lp_map, [d for _, _, d in items])

    def _sample(self, reqs: list[Req], rows_logits: torch.Tensor) -> torch.Tensor:
        """Next token per row, on the device. `step` counts tokens still in flight (overlap)."""
        banned = [tuple(self.eos_ids | set(r.params.stop_token_ids)) if len(r.output_ids) < r.params.min_new_tokens
                  else () for r in reqs]
        needs_adjust = any(r.params.has_penalties or r.params.logit_bias or b for r, b in zip(reqs, banned))
        constrained = any(r.grammar is not None for r in reqs)
        if not needs_adjust and not constrained and all(r.params.is_greedy for r in reqs):
            return rows_logits.argmax(dim=-1)  # the common greedy case: no per-row tensors to build
        sample_rows = [
            SampleRow(params=r.params, seed=r.seed, step=len(r.output_ids) + r.num_inflight,
                      output_ids=r.output_ids, prompt_ids=r.input_ids, banned_ids=b)
            for r, b in zip(reqs, banned)
        ]
        sbatch = SamplingBatch.build(sample_rows, rows_logits.shape[1], rows_logits.device)
        adjusted = apply_logit_adjustments(rows_logits.clone(), sbatch) if needs_adjust else rows_logits
        if constrained:
            from radixlm.constrained import apply_token_bitmask_

            if adjusted is rows_logits:
                adjusted = rows_logits.clone()
            apply_token_bitmask_(adjusted, self._grammar_runtime().bitmask(reqs, adjusted.device))
        return sample(adjusted, sbatch)

    def _output_logprobs(self, reqs: list[Req], rows_logits: torch.Tensor, next_ids: torch.Tensor
                         ) -> dict[int, tuple[float, list[tuple[float, int]] | None]]:
        want_lp = [i for i, r in enumerate(reqs) if r.return_logprob]
        lp_map: dict[int, tuple[float, list[tuple[float, int]] | None]] = {}
        if not want_lp:
            return lp_map
        k = max(reqs[i].top_logprobs_num for i in want_lp)
        chosen, top_vals, top_ids = token_logprobs(rows_logits[want_lp], next_ids[want_lp], k)
        chosen_l = chosen.tolist()
        tv = top_vals.tolist() if top_vals is not None else None
        ti = top_ids.tolist() if top_ids is not None else None
        for j, i in enumerate(want_lp):
            n = reqs[i].top_logprobs_num
            top = list(zip(tv[j][:n], ti[j][:n])) if tv is not None and ti is not None and n > 0 else None
            lp_map[i] = (chosen_l[j], top)
        return lp_map

    def _commit(self, reqs: list[Req], ids: list[int], lp_map: dict[int, tuple[float, list[tuple[float, int]] | None]],
                decoding: list[bool], allow_jump: bool = True) -> None:
        """Append sampled tokens on the host, then finish / jump forward / keep decoding.
        `decoding[i]`: the request was already running (else it just finished a prefill)."""
        sched = self.sched
        sched.record_generated(len(ids))
        constrained = [i for i, r in enumerate(reqs) if r.grammar is not None]
        if constrained:  # all matchers at once, then their next masks start in the background
            self._grammar_runtime().advance_many([reqs[i] for i in constrained], [ids[i] for i in constrained])
        for i, (req, tok, was_running) in enumerate(zip(reqs, ids, decoding)):
            req.output_ids.append(tok)
            if i in lp_map:
                lp, top = lp_map[i]
                req.pending_output_logprobs.append((lp, tok))
                if req.top_logprobs_num > 0:
                    req.pending_output_top.append(top or [])
            reason = self._check_finish(req, tok)
            jumped = reason is None and allow_jump and self._jump_forward(req)
            if was_running and (reason is not None or jumped):
                sched.running.remove(req)
            if reason is not None:
                sched._finish(req, reason)
            elif jumped:
                sched.partial.append(req)  # its forced tokens need an extend step
            elif not was_running:
                sched.running.append(req)
            if reason is None and req.stream and len(req.output_ids) - req.sent_output_len >= sched.args.stream_interval:
                sched.outputs.append(self.make_output(req))

    # ---------------------------------------------------------------- overlap
    def can_defer(self, batch: ScheduledBatch) -> bool:
        """Whether this decode batch can be sampled on the device and committed a step later:
        nothing in its sampling may depend on host state that the pending step would change."""
        if batch.mode is not ForwardMode.DECODE:
            return False
        # Constrained rows too, once jump-forward would not be used (a jump rewrites the tokens
        # the next step already consumes): their step-k tokens are committed before sampling.
        grammar_ok = self.sched.args.disable_jump_forward or self._jump_min_tokens() > JUMP_MAX_USEFUL_TOKENS
        return all(
            (r.grammar is None or grammar_ok) and not r.return_logprob and not r.params.needs_output_history
            and len(r.output_ids) + r.num_inflight >= r.params.min_new_tokens
            for r in batch.reqs
        )

    def launch(self, batch: ScheduledBatch, logits: torch.Tensor) -> InflightBatch:
        next_ids = self._sample(batch.reqs, logits)
        for i, req in enumerate(batch.reqs):
            req.num_inflight += 1
            req.inflight_row = i
        return InflightBatch.start(batch.reqs, next_ids)

    def commit_inflight(self, inflight: InflightBatch, allow_jump: bool = True) -> None:
        """`allow_jump=False` while a step that consumes these tokens is already launched."""
        ids = inflight.wait()
        live_reqs, live_ids = [], []
        for req, tok in zip(inflight.reqs, ids):
            req.num_inflight -= 1
            if not req.finished:  # finished meanwhile: this token was computed past the end, drop it
                live_reqs.append(req)
                live_ids.append(tok)
        self._commit(live_reqs, live_ids, {}, [True] * len(live_reqs), allow_jump)

    def _jump_forward(self, req: Req) -> bool:
        """Grammar-forced text is appended without decode steps (not with logprobs: they would have holes)."""
        if req.grammar is None or req.return_logprob or self.sched.args.disable_jump_forward:
            return False
        min_tokens = self._jump_min_tokens()
        if min_tokens > JUMP_MAX_USEFUL_TOKENS:
            return False  # forced runs that long are rare: not worth computing the forced prefix
        return self._grammar_runtime().jump_forward(req, allow_retokenize=True, min_tokens=min_tokens) > 0

    def _jump_min_tokens(self) -> int:
        """The shortest forced run worth a jump. Its forced tokens need an extend step, which takes
        the whole batch off the CUDA-graph decode path for one eager (mixed) forward pass, costing
        about JUMP_EAGER_EXTRA_STEPS decode steps for every running row; decoding the run instead
        costs this row one step per token (the mask leaves one choice) and the others nothing. On
        the CPU (no graphs) an extension costs what a decode step costs: every jump pays."""
        if self.sched.runner.graph_runner is None:
            return 1
        return 1 + int(JUMP_EAGER_EXTRA_STEPS * len(self.sched.running))

    def _check_finish(self, req: Req, tok: int) -> dict[str, Any] | None:
        p = req.params
        if tok in p.stop_token_ids:
            return {"type": "stop", "matched": tok}
        if not p.ignore_eos and tok in self.eos_ids:
            return {"type": "stop", "matched": tok}
        if req.grammar is not None and self._grammar_runtime().is_terminated(req):
            return {"type": "stop", "matched": None}
        if p.stop and self.tokenizer is not None:
            window = max(len(s) for s in p.stop) + 3
            tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        if p.stop_regex and self.tokenizer is not None:
            regexes = compile_stop_regexes(p.stop_regex)
            ids = req.output_ids if regexes.window_tokens is None else req.output_ids[-regexes.window_tokens:]
            matched = regexes.search(self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens))
            if matched is not None:
                return {"type": "stop", "matched": matched, "regex": True}
        if len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.sched.runner.context_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def make_output(self, req: Req) -> ReqOutput:
        new_ids = req.output_ids[req.sent_output_len :]
        req.sent_output_len = len(req.output_ids)
        out = ReqOutput(
            rid=req.rid,
            output_ids=new_ids,
            finished_reason=req.finished_reason,
            prompt_tokens=len(req.input_ids),
            cached_tokens=req.cached_tokens,
            completion_tokens=len(req.output_ids),
            forced_tokens=req.forced_tokens,
            num_retractions=req.num_retractions,
        )
        if req.return_logprob:
            if req.pending_input_logprobs or req.input_logprobs_done:
                out.input_token_logprobs, req.pending_input_logprobs = req.pending_input_logprobs, []
                out.input_top_logprobs, req.pending_input_top = req.pending_input_top, []
            out.output_token_logprobs, req.pending_output_logprobs = req.pending_output_logprobs, []
            out.output_top_logprobs, req.pending_output_top = req.pending_output_top, []
        return out
