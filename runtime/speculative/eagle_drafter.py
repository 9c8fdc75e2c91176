"""EAGLE-3 drafting: one draft layer fed by the target's own hidden states, chains (top-k 1).

An entry of a request's draft KV at target position p is the head's layer run on the pair
(embedding of token p + 1, the target's hidden state at p, projected by fc): both verified, so
the draft KV only ever holds entries of verified tokens. After every target forward (prefill,
decode or verify) the target's aux hidden states of the step's tokens are projected and kept
(`stash`: whole steps until a step drafts, then per request, eagle_hidden.py): positions computed
again replace what was kept from them (rejected drafts' rows are overwritten by the next step,
which starts at the first of them). At propose time each drafting request feeds its new verified
entries in one extend pass (catch-up); the output at its last entry (position fill_len - 2, whose
next token is the last sampled one) gives the first draft and the hidden state the next draft
step starts from; k - 1 decode passes give the rest. Then the draft KV is cut back before that
last entry (decode entries came from the head's own hidden states, not the target's; the last
entry is fed again next time, so its output is always at hand).

Entries are KV rows of the head's own paged pool (one layer); positions only set the rotary
angles, so a request may have gaps (a prefix matched in the radix cache was never run by the
target for it, and hidden states of a request that does not draft for long are dropped beyond
eagle_hidden's bounds): the head then attends to fewer tokens, which lowers acceptance, never
correctness.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch

from radixlm.runtime.attention import PagedAttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.models.llama import rope_cos_sin_cache
from radixlm.runtime.request import Req
from radixlm.runtime.speculative.eagle_graphs import EagleGraphs
from radixlm.runtime.speculative.eagle_head import EagleHead, EagleHeadConfig
from radixlm.runtime.speculative.eagle_hidden import HiddenLog, Pending
from radixlm.runtime.weight_loader import iter_safetensors


@dataclass
class HeadRow:
    """One request's draft KV: entry j is target position positions[j], fed with token tokens[j]
    (the token at positions[j] + 1)."""

    row: int
    positions: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def head_memory(head_dir: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(weights bytes, KV bytes per token) of the head, for the target to leave on the GPU."""
    cfg = EagleHeadConfig.from_folder(head_dir)
    size = torch.tensor([], dtype=dtype).element_size()
    c = cfg.layer
    return cfg.param_count(has_embedding=_has_embedding(head_dir)) * size, TokenToKVPool.bytes_per_token(
        1, c.num_kv_heads, c.head_dim, dtype)


def _has_embedding(head_dir: Path) -> bool:
    from safetensors import safe_open

    for path in sorted(Path(head_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if "embed_tokens.weight" in f.keys():
                return True
    return False


class EagleDrafter:
    def __init__(self, head_dir: Path, runner: ModelRunner, max_drafts: int) -> None:
        target = runner.model
        cfg = EagleHeadConfig.from_folder(head_dir)
        if cfg.layer.vocab_size != runner.vocab_size or cfg.target_hidden_size != runner.model_config.hidden_size:
            raise ValueError(f"speculative_draft_model_path: the head is for a target of vocabulary {cfg.layer.vocab_size} "
                             f"and hidden size {cfg.target_hidden_size}, this one has {runner.vocab_size} and "
                             f"{runner.model_config.hidden_size}")
        cfg = EagleHeadConfig(**{**cfg.__dict__, "aux_layer_ids": target.aux_layers})
        self.device = runner.device
        with torch.device("meta"):
            head = EagleHead(cfg, _has_embedding(head_dir))
        self.head = head.to(runner.dtype).to_empty(device=self.device)
        self.head.load_weights(iter_safetensors(head_dir))
        self.head.eval()
        self.target_embed = target.embed_tokens  # shared unless the head has its own
        c = cfg.layer
        self.max_drafts = max_drafts
        self.pool = TokenToKVPool(runner.max_total_tokens + runner.max_running_requests * max_drafts, 1,
                                  c.num_kv_heads, c.head_dim, runner.dtype, self.device)
        self.rows_pool = ReqToTokenPool(runner.max_running_requests + 8, runner.context_len + max_drafts + 8, self.device)
        self.ops = target.ops
        self.attn = PagedAttentionBackend(self.ops, self.rows_pool, self.pool, c.head_dim**-0.5)
        self.cos_sin = rope_cos_sin_cache(c, runner.context_len + max_drafts + 8).to(self.device)
        self.rows: dict[int, HeadRow] = {}
        self.log = HiddenLog()  # whole steps' hidden states, split into `pending` when a step drafts
        self.pending: dict[int, Pending] = {}
        self.graphs: EagleGraphs | None = None  # drafting as one CUDA graph per batch bucket and k
        if runner.graph_runner is not None and max_drafts > 0:
            self.graphs = EagleGraphs(self, runner.graph_runner.max_bs)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: the target's, unless the head has its own."""
        if self.head.embed_tokens is None:
            return self.target_embed(ids)
        return torch.nn.functional.embedding(ids, self.head.embed_tokens)

    # ---------------------------------------------------------------- the target's hidden states
    @torch.inference_mode()
    def stash(self, reqs: list[Req], prefix_lens: list[int], extend_lens: list[int], aux: torch.Tensor) -> None:
        """After a target forward whose tokens were reqs' (in order, extend_lens each, from prefix_lens):
        keep their projected hidden states (one GEMM, no per-request work: see eagle_hidden.py)."""
        assert aux.shape[0] == sum(extend_lens), "aux hidden states of another batch"
        self.log.add(reqs, prefix_lens, extend_lens, self.head.project(aux))

    # ---------------------------------------------------------------- KV bookkeeping
    def _truncate(self, state: HeadRow, n: int) -> None:
        if n < len(state.positions):
            self.pool.free(self.rows_pool.slots(state.row, n, len(state.positions)))
            del state.positions[n:], state.tokens[n:]

    def _sync(self, state: HeadRow, req: Req) -> None:
        """Keep the entries whose next token is still the request's (jump-forward may rewrite its tail)
        and that lie before its last position (fed again each time)."""
        n, fill_len = len(state.positions), req.fill_len
        while n and (state.positions[n - 1] + 2 >= fill_len
                     or req.fill_slice(state.positions[n - 1] + 1, state.positions[n - 1] + 2)[0] != state.tokens[n - 1]):
            n -= 1
        self._truncate(state, n)

    def forget(self, key: int) -> None:
        self.pending.pop(key, None)
        self.log.forget(key)
        state = self.rows.pop(key, None)
        if state is not None:
            self._truncate(state, 0)
            self.rows_pool.free(state.row)

    def on_verified(self, key: int, accepted: int) -> None:
        """Nothing to drop: propose already cut the draft KV back to verified entries."""

    # ---------------------------------------------------------------- drafting
    @torch.inference_mode()
    def propose(self, reqs: list[Req], limits: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        if not any(k > 0 for k in limits):
            return out
        self.log.drain(self.pending)
        active: list[tuple[int, HeadRow, int, list[int], list[int], torch.Tensor]] = []
        free = self.pool.available()
        for i, (req, k) in enumerate(zip(reqs, limits)):
            pending = self.pending.get(id(req))
            if k <= 0 or pending is None:
                continue
            state = self.rows.get(id(req))
            if state is None:
                row = self.rows_pool.alloc()
                if row is None:
                    continue
                state = self.rows[id(req)] = HeadRow(row)
            self._sync(state, req)
            fill_len = req.fill_len
            if free < fill_len - 1 - len(state.positions) + k:
                continue  # the head's pool is short: this request decodes plainly this step
            new = pending.take(state.positions[-1] if state.positions else -1, fill_len - 2)
            if new is None:
                continue  # no hidden state of its last position (e.g. the step that computed it was cached)
            positions, hidden = new
            free -= len(positions) + k - 1
            nexts = req.fill_slice(positions[0] + 1, positions[-1] + 2)  # tokens p + 1 (gaps skipped below)
            if len(nexts) != len(positions):
                nexts = [nexts[p - positions[0]] for p in positions]
            active.append((i, state, k, positions, nexts, hidden))
        if not active:
            return out
        depth = max(a[2] for a in active)
        if self.graphs is not None and self.graphs.fits(len(active), depth):
            slots = self._graph_slots(active, depth)
            if slots is not None:
                return self._propose_graphed(out, active, depth, slots)
        # Catch-up: each row's new entries (token p + 1, hidden p); the output at the last one drafts.
        states = [a[1] for a in active]
        hidden = torch.cat([a[5] for a in active]) if len(active) > 1 else active[0][5]
        logits, out_hidden = self._forward(ForwardMode.EXTEND, states, [a[3] for a in active],
                                           [t for a in active for t in a[4]], hidden)
        cuts = [len(s.positions) - 1 for s in states]  # the draft KV is cut back to here afterwards
        tokens = self.head.draft_to_target(logits.argmax(dim=-1))
        ends = list(accumulate(len(a[3]) for a in active))
        hidden = out_hidden[torch.tensor(ends, device=self.device) - 1]
        drafted = [tokens]
        live = list(range(len(active)))
        for step in range(1, depth):
            keep = [j for j, li in enumerate(live) if active[li][2] > step]
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=self.device)
                tokens, hidden, live = tokens[idx], hidden[idx], [live[j] for j in keep]
            rows = [states[li] for li in live]
            logits, hidden = self._forward(ForwardMode.DECODE, rows, [[s.positions[-1] + 1] for s in rows], tokens, hidden)
            tokens = self.head.draft_to_target(logits.argmax(dim=-1))
            full = torch.full((len(active),), -1, dtype=tokens.dtype, device=self.device)
            drafted.append(full.index_copy_(0, torch.tensor(live, device=self.device), tokens))
        table = torch.stack(drafted, dim=1).tolist()  # one device sync for every step
        for (i, state, k, *_), row, cut in zip(active, table, cuts):
            out[i] = row[:k]
            self._truncate(state, cut)
        return out

    def _forward(self, mode: ForwardMode, states: list[HeadRow], positions: list[list[int]],
                 ids: list[int] | torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append entries to each row's draft KV and run the head; (logits at each row's last entry,
        every entry's output hidden)."""
        lens = [len(p) for p in positions]
        slots = self.pool.alloc(sum(lens))
        assert slots is not None  # checked by propose
        rows, seq_lens, flat = [], [], []
        offset = 0
        for state, pos, n in zip(states, positions, lens):
            self.rows_pool.write(state.row, len(state.positions), slots[offset : offset + n])
            state.positions += pos
            rows.append(state.row)
            seq_lens.append(len(state.positions))
            flat += pos
            offset += n
        fb = ForwardBatch.for_rows(mode, ids, flat, slots, rows, seq_lens, lens, self.device)
        host_ids = ids if isinstance(ids, list) else None
        offset = 0
        for state, n in zip(states, lens):  # tokens of decode entries are not needed: they are cut back
            state.tokens += host_ids[offset : offset + n] if host_ids is not None else [-1] * n
            offset += n
        self.attn.begin_forward(fb)
        cos_sin = self.cos_sin if self.ops.rotary_table is None else self.ops.rotary_table(fb.positions, self.cos_sin)
        return self.head(fb, self.attn, self.ops, cos_sin, self.embed(fb.input_ids), hidden)

    # ---------------------------------------------------------------- drafting in a CUDA graph
    def _graph_slots(self, active: list, depth: int) -> torch.Tensor | None:
        """Slots of the graph's entries: each row's last C catch-up entries, then depth - 1 chain
        entries per row (step-major); None when the head's pool is short (then drafting is eager)."""
        assert self.graphs is not None
        caught = sum(min(len(a[3]), self.graphs.C) for a in active)
        early = sum(max(len(a[3]) - self.graphs.C, 0) for a in active)
        if self.pool.available() < early + caught + (depth - 1) * len(active):
            return None
        return self.pool.alloc(caught + (depth - 1) * len(active))

    def _propose_graphed(self, out: list[list[int]], active: list, depth: int, slots: torch.Tensor) -> list[list[int]]:
        assert self.graphs is not None
        C = self.graphs.C
        early = [a for a in active if len(a[3]) > C]
        if early:  # entries older than the last C: fed eagerly first (their outputs are not needed)
            self._forward(ForwardMode.EXTEND, [a[1] for a in early], [a[3][:-C] for a in early],
                          [t for a in early for t in a[4][:-C]], torch.cat([a[5][:-C] for a in early]))
        states = [a[1] for a in active]
        before = [len(s.positions) for s in states]
        positions, ids = [a[3][-C:] for a in active], [a[4][-C:] for a in active]
        table = self.graphs.draft([s.row for s in states], before, positions, ids, [a[5][-C:] for a in active],
                                  depth, slots)
        for (i, state, k, *_), pos, tok, cut, row in zip(active, positions, ids, before, table):
            # the graph's entries: catch-up, then the chain (cut back at once, with the last catch-up one)
            state.positions += pos + [pos[-1] + s for s in range(1, depth)]
            state.tokens += tok + [-1] * (depth - 1)
            self._truncate(state, cut + len(pos) - 1)
            out[i] = row[:k]
        return out
