"""STANDALONE drafting: a smaller model of our families, sharing the target's tokenizer, drafts
greedily from its own paged KV (its own ModelRunner: weights, KV pool, request rows).

Per step, for the requests granted k > 0 drafts: one extend pass catches each request's draft KV up
to its last token (the whole prompt the first time; the tokens verified since, later) and yields
the first draft; k - 1 decode passes yield the rest. After verification the draft KV of rejected
drafts is dropped, so the next catch-up starts from the verified tokens. Drafts are greedy (the
draft distribution is a point mass), so verification is exact at any temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.request import Req
from radixlm.runtime.server_args import ServerArgs


@dataclass
class DraftRow:
    """One request's draft KV: req_to_token row `row` holds the KV of `tokens` (prompt + output
    verified so far, plus drafts until verified)."""

    row: int
    tokens: list[int] = field(default_factory=list)
    base: int = 0  # fill_len when it last drafted
    drafted: int = 0


def draft_memory(draft_dir: Path, dtype: str, device: torch.device) -> tuple[int, int]:
    """(weights bytes, KV bytes per token) the draft model will take: the target sizes its own KV
    pool from the GPU memory left after these (the draft's pool has as many tokens as the target's)."""
    from radixlm.runtime.kv_pool import TokenToKVPool
    from radixlm.runtime.model_config import ModelConfig, resolve_dtype

    mc = ModelConfig.from_pretrained(draft_dir)
    dt = resolve_dtype(dtype, mc, device)
    size = torch.tensor([], dtype=dt).element_size()
    attn = mc.hidden_size * mc.head_dim * (2 * mc.num_heads + 2 * mc.num_kv_heads)
    params = mc.num_layers * (attn + 3 * mc.hidden_size * mc.intermediate_size)
    params += mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
    return params * size, TokenToKVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, dt)


class DraftModelDrafter:
    def __init__(self, args: ServerArgs, draft_dir: Path, target_vocab: int, max_total_tokens: int,
                 max_running: int) -> None:
        dargs = args.replace(model_path=str(draft_dir), max_total_tokens=max_total_tokens,
                             max_running_requests=max_running, speculative_algorithm=None,
                             speculative_draft_model_path=None, enable_lora=False, lora_paths=None,
                             cascade_attention="off")  # its batches are built here, without tree nodes
        self.runner = ModelRunner(dargs, draft_dir)
        if self.runner.vocab_size != target_vocab:
            raise ValueError(f"speculative_draft_model_path: its vocabulary ({self.runner.vocab_size}) is not the "
                             f"target's ({target_vocab}); the draft model must share the tokenizer")
        self.pool = self.runner.kv_pool
        self.rows_pool = self.runner.req_to_token_pool
        self.rows: dict[int, DraftRow] = {}

    # ---------------------------------------------------------------- KV bookkeeping
    def _truncate(self, state: DraftRow, n: int) -> None:
        if n < len(state.tokens):
            self.pool.free(self.rows_pool.slots(state.row, n, len(state.tokens)))
            del state.tokens[n:]

    def _sync(self, state: DraftRow, fill: list[int]) -> None:
        """Keep only the draft KV of tokens still in the request's fill (jump-forward may rewrite
        its last token): the longest common prefix."""
        n = min(len(state.tokens), len(fill) - 1)  # the last token is always recomputed (its logits draft)
        if state.tokens[:n] != fill[:n]:
            n = next(i for i, (a, b) in enumerate(zip(state.tokens, fill)) if a != b)
        self._truncate(state, n)

    def forget(self, key: int) -> None:
        state = self.rows.pop(key, None)
        if state is not None:
            self._truncate(state, 0)
            self.rows_pool.free(state.row)

    def on_verified(self, key: int, accepted: int) -> None:
        """Drop the draft KV of drafts that were not accepted."""
        state = self.rows.get(key)
        if state is not None and state.drafted:
            self._truncate(state, state.base + min(accepted, state.drafted - 1))
            state.drafted = 0

    # ---------------------------------------------------------------- drafting
    def propose(self, reqs: list[Req], limits: list[int]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in reqs]
        active: list[tuple[int, Req, DraftRow, int]] = []
        free = self.pool.available()
        for i, (req, k) in enumerate(zip(reqs, limits)):
            if k <= 0:
                continue
            state = self.rows.get(id(req))
            if state is None:
                row = self.rows_pool.alloc()
                if row is None:
                    continue
                state = self.rows[id(req)] = DraftRow(row)
            fill = req.fill_ids
            self._sync(state, fill)
            need = len(fill) - len(state.tokens) + k - 1
            if need > free:
                continue  # the draft pool is short: this request decodes plainly this step
            free -= need
            active.append((i, req, state, k))
        if not active:
            return out
        # Catch-up: every active row's missing tokens, its last one included; logits at the last.
        chunks = [req.fill_ids[len(state.tokens):] for _, req, state, _ in active]
        last = self._forward(ForwardMode.EXTEND, [s for _, _, s, _ in active], chunks)
        for (i, req, state, _), tok in zip(active, last):
            state.base = req.fill_len
            state.drafted = 0
            out[i].append(tok)
        depth = max(k for *_, k in active)
        for step in range(1, depth):
            live = [(i, s) for i, _, s, k in active if k > step]
            last = self._forward(ForwardMode.DECODE, [s for _, s in live], [[out[i][-1]] for i, _ in live])
            for (i, _), tok in zip(live, last):
                out[i].append(tok)
        for i, _, state, _ in active:
            state.drafted = len(out[i])
        return out

    def _forward(self, mode: ForwardMode, states: list[DraftRow], chunks: list[list[int]]) -> list[int]:
        """Run the draft model over `chunks` (appended to each row's KV); greedy token after each."""
        lens = [len(c) for c in chunks]
        slots = self.pool.alloc(sum(lens))
        assert slots is not None  # checked by propose
        ids, positions, rows, seq_lens = [], [], [], []
        offset = 0
        for state, chunk, n in zip(states, chunks, lens):
            start = len(state.tokens)
            self.rows_pool.write(state.row, start, slots[offset : offset + n])
            ids += chunk
            positions += range(start, start + n)
            state.tokens += chunk
            rows.append(state.row)
            seq_lens.append(start + n)
            offset += n
        fb = ForwardBatch.for_rows(mode, ids, positions, slots, rows, seq_lens, lens, self.runner.device)
        return self.runner.forward(fb).argmax(dim=-1).tolist()
