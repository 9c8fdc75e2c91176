"""The ranks of one replica in lockstep: rank 0's scheduler decides each batch, every rank runs it.

Per forward, rank 0 sends a header (mode, sizes and the host lists of the ForwardBatch) over the
gloo control group and one int64 tensor over the default group (NCCL on GPUs): the token ids,
positions, KV slots, logits rows and the batch's rows of req_to_token. The other ranks keep no
scheduler state: whatever rank 0 did to those rows (prefix matches, re-pointing at the radix tree,
n > 1 sharing) arrives with the step, and KV copies it made between steps are replayed first.
Sampling happens on rank 0 alone, on logits all-gathered over the TP group (or, with pipeline
stages, received from the last stage).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from radixlm.runtime.fault_isolation import SchedulerFatalError, describe
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.log_setup import configure_logging
from radixlm.runtime.parallel.state import (
    LOST_PEERS_EXIT_CODE,
    ParallelState,
    RankInfo,
    destroy_parallel,
    init_parallel,
)
from radixlm.runtime.server_args import ServerArgs

if TYPE_CHECKING:
    from radixlm.runtime.model_runner import ModelRunner

logger = logging.getLogger(__name__)

def make_forward_batch(mode: ForwardMode, input_ids: torch.Tensor, positions: torch.Tensor, out_cache_loc: torch.Tensor,
                       logits_indices: torch.Tensor, rows: list[int], seq_lens: list[int], ext_lens: list[int],
                       device: torch.device) -> ForwardBatch:
    """A ForwardBatch from its token tensors and per-request host lists."""
    starts = [0]
    for e in ext_lens[:-1]:
        starts.append(starts[-1] + e)

    def dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return ForwardBatch(
        mode=mode, input_ids=input_ids, positions=positions, out_cache_loc=out_cache_loc,
        req_pool_indices=dev(rows, torch.int64), seq_lens=dev(seq_lens, torch.int32),
        req_pool_indices_cpu=list(rows), seq_lens_cpu=list(seq_lens), extend_seq_lens_cpu=list(ext_lens),
        extend_seq_lens=dev(ext_lens, torch.int32), extend_start_loc=dev(starts, torch.int32),
        logits_indices=logits_indices,
    )


def split_batch(batch: ForwardBatch, parts: int) -> list[ForwardBatch]:
    """`parts` batches over consecutive token ranges of `batch`, to run one after another. A request
    cut in two is an extend on top of its own first part, whose KV the stage has stored by then."""
    total = batch.num_tokens
    bounds = [total * k // parts for k in range(parts + 1)]
    logits_rows = batch.logits_indices.tolist()
    out = []
    for lo, hi in zip(bounds, bounds[1:]):
        rows, seq_lens, ext_lens = [], [], []
        start = 0
        for row, seq_len, ext in zip(batch.req_pool_indices_cpu, batch.seq_lens_cpu, batch.extend_seq_lens_cpu):
            a, b = max(lo, start), min(hi, start + ext)
            if a < b:
                rows.append(row)
                ext_lens.append(b - a)
                seq_lens.append(seq_len - ext + (b - start))
            start += ext
        picked = torch.tensor([r - lo for r in logits_rows if lo <= r < hi], dtype=torch.int64)
        out.append(make_forward_batch(batch.mode, batch.input_ids[lo:hi], batch.positions[lo:hi],
                                      batch.out_cache_loc[lo:hi], picked.to(batch.input_ids.device),
                                      rows, seq_lens, ext_lens, batch.input_ids.device))
    return out


class StepChannel:
    """Sends each batch from rank 0 to the replica's other ranks and runs it on all of them."""

    def __init__(self, runner: "ModelRunner", state: ParallelState) -> None:
        self.runner = runner
        self.state = state
        self.info: RankInfo = state.info
        self.device = runner.device
        # Pipeline micro-batching splits a step only when every part keeps at least this many tokens:
        # below that a decode step is bound by reading the weights, and splitting would read them twice.
        self.micro_batch_tokens = runner.args.pp_micro_batch_tokens
        self.pending_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.info.rank == 0:
            # KV copies rank 0 makes between steps (n > 1 without the radix cache) are replayed by the others.
            pool = runner.kv_pool
            copy = pool.copy_slots

            def copy_and_record(src: torch.Tensor, dst: torch.Tensor) -> None:
                copy(src, dst)
                self.pending_copies.append((src.to(self.device, torch.int64), dst.to(self.device, torch.int64)))

            pool.copy_slots = copy_and_record  # type: ignore[method-assign]

    # ---------------------------------------------------------------- rank 0
    def drive(self, batch: ForwardBatch) -> torch.Tensor:
        """Rank 0's step. A failure here is fatal, not one step's fault: the other ranks are left in
        a collective rank 0 will never finish (or one of them is gone), so the group is out of step."""
        try:
            self._send(batch)
            logits = self.run(batch)
        except Exception as exc:  # noqa: BLE001 - any failure mid-step breaks the group's lock-step
            raise SchedulerFatalError(f"the {self.info.world_size} parallel ranks fell out of step: "
                                      f"{describe(exc)}") from exc
        assert logits is not None
        return logits

    def _send(self, batch: ForwardBatch) -> None:
        width = batch.max_seq_len
        copies, self.pending_copies = self.pending_copies, []
        src = torch.cat([s for s, _ in copies]) if copies else batch.input_ids.new_empty(0)
        dst = torch.cat([d for _, d in copies]) if copies else batch.input_ids.new_empty(0)
        header = (batch.mode.value, batch.num_tokens, int(batch.logits_indices.shape[0]), width,
                  batch.req_pool_indices_cpu, batch.seq_lens_cpu, batch.extend_seq_lens_cpu, int(src.shape[0]))
        dist.broadcast_object_list([header], src=0, group=self.state.ctrl_group)
        req_to_token = self.runner.req_to_token_pool.req_to_token
        rows = req_to_token[batch.req_pool_indices, :width].to(torch.int64).flatten()
        payload = torch.cat([batch.input_ids, batch.positions, batch.out_cache_loc, batch.logits_indices, rows, src, dst])
        dist.broadcast(payload, src=0)

    def stop(self) -> None:
        """Tell the other ranks to exit (they may be gone already)."""
        try:
            dist.broadcast_object_list([None], src=0, group=self.state.ctrl_group)
        except (RuntimeError, ValueError) as exc:
            logger.warning("could not reach the other ranks at shutdown: %s", exc)

    # ---------------------------------------------------------------- other ranks
    def receive(self) -> ForwardBatch | None:
        """Wait for rank 0's next batch; None when it shuts down."""
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.state.ctrl_group)
        if box[0] is None:
            return None
        mode, tokens, num_logits, width, rows, seq_lens, ext_lens, num_copies = box[0]
        payload = torch.empty(3 * tokens + num_logits + len(rows) * width + 2 * num_copies,
                              dtype=torch.int64, device=self.device)
        dist.broadcast(payload, src=0)
        ids, pos, loc, logits_rows, block, src, dst = payload.split(
            [tokens, tokens, tokens, num_logits, len(rows) * width, num_copies, num_copies])
        if rows and width:
            row_t = torch.tensor(rows, dtype=torch.int64).to(self.device)
            self.runner.req_to_token_pool.req_to_token[row_t, :width] = block.view(len(rows), width).to(torch.int32)
        if num_copies:
            self.runner.kv_pool.copy_slots(src, dst)
        return make_forward_batch(ForwardMode(mode), ids, pos, loc, logits_rows, rows, seq_lens, ext_lens, self.device)

    # ---------------------------------------------------------------- every rank
    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor | None:
        """This rank's part of the forward; the logits on rank 0, None elsewhere."""
        if self.info.pp_size == 1:
            logits = self.runner.forward_local(batch)
            return logits if self.info.rank == 0 else None
        return self._pipeline(batch)

    def _micro_batches(self, batch: ForwardBatch) -> int:
        parts = min(self.info.pp_size, batch.num_tokens // max(self.micro_batch_tokens, 1))
        return parts if parts >= 2 else 1

    def _pipeline(self, batch: ForwardBatch) -> torch.Tensor | None:
        """Stage by stage, micro-batch by micro-batch: stage s runs part k while stage s+1 runs
        part k-1. (hidden, residual) go to the next stage's same TP rank; the last stage's TP rank 0
        sends each part's logits to rank 0."""
        info, runner = self.info, self.runner
        model, attn = runner.model, runner.attn_backend
        stage = model.stage
        count = self._micro_batches(batch)
        parts = split_batch(batch, count) if count > 1 else [batch]
        hidden_size = model.cfg.hidden_size
        sends = []  # (work, tensor): the tensor must outlive its isend
        for part in parts:
            attn.begin_forward(part)
            intermediate = None
            if not stage.first:
                buf = torch.empty(2, part.num_tokens, hidden_size, dtype=runner.dtype, device=self.device)
                dist.recv(buf, src=info.peer(stage.rank - 1))
                intermediate = (buf[0], buf[1])
            out = model(part, attn, intermediate)
            if not stage.last:
                packed = torch.stack(out)
                sends.append((dist.isend(packed, dst=info.peer(stage.rank + 1)), packed))
            elif part.logits_indices.shape[0]:
                logits = model.compute_logits(out)
                if info.tp_rank == 0:
                    sends.append((dist.isend(logits, dst=0), logits))
        if info.rank != 0:
            for work, _ in sends:
                work.wait()
            return None
        vocab = model.cfg.vocab_size
        results = []
        for part in parts:
            logits = torch.empty(part.logits_indices.shape[0], vocab, dtype=torch.float32, device=self.device)
            if logits.shape[0]:
                dist.recv(logits, src=info.peer(info.pp_size - 1, 0))
            results.append(logits)
        for work, _ in sends:
            work.wait()
        return results[0] if len(results) == 1 else torch.cat(results)


def run_worker_process(args: ServerArgs, model_dir: str, info: RankInfo) -> None:
    """Entry point of a rank other than 0: load this rank's shard, then run rank 0's batches until told to stop."""
    configure_logging(args.log_level, f"replica {info.replica} rank {info.rank}")
    from radixlm.runtime.model_runner import ModelRunner

    init_parallel(info, args.device)
    runner = ModelRunner(args, Path(model_dir))
    channel = runner.channel
    assert channel is not None
    try:
        while (batch := channel.receive()) is not None:
            channel.run(batch)
    except KeyboardInterrupt:
        return
    except RuntimeError:  # typically rank 0 (or a peer) went away mid-collective
        logger.exception("rank %d stops: a collective with the replica's other ranks failed", info.rank)
        raise SystemExit(LOST_PEERS_EXIT_CODE) from None
    destroy_parallel()
