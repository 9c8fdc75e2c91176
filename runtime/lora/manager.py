"""Which adapters exist, which are in host memory, which sit in device slots; one batch's setup.

Three tiers, each with its own bound: registered adapters (every name a request may use: from
--lora-paths and /load_lora_adapter), host copies (at most --max-loaded-loras; an evicted one is
read again from its folder when a request needs it) and device slots (--max-loras-per-batch,
the adapters one forward can mix). Host copies and slots are evicted by --lora-eviction-policy
(lru: least recently used first; fifo: first loaded first), never one the current batch uses.
The scheduler keeps every batch within the slot count (`SlotBudget`), so a batch always fits.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.lora import projection
from radixlm.runtime.lora.adapter import AdapterError, LoRAAdapter, ModelShape, read_adapter
from radixlm.runtime.lora.pool import LoRAPool
from radixlm.runtime.lora.sgmv import LoRASegments, graph_segments_row
from radixlm.runtime.lora.warmup import warm_up_prefill_kernels

if TYPE_CHECKING:
    from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)
LOAD_THREADS = 8  # adapters read and packed at once at start-up


@dataclass
class Registered:
    name: str
    path: str
    uid: str  # name + load generation: the prefix-cache namespace (a reload never reuses old KV)
    host: torch.Tensor | None = None  # the weights packed as one slot row (LoRAPool.pack)
    loaded_at: float = 0.0  # when the host copy was read (fifo)
    used_at: float = 0.0  # last batch that used it (lru)


@dataclass
class _Slot:
    name: str | None = None
    loaded_at: float = 0.0
    used_at: float = 0.0


@dataclass
class LoRAOptions:
    max_loras_per_batch: int
    max_loaded_loras: int | None
    max_lora_rank: int
    eviction_policy: str  # lru | fifo
    kernels: str = "overlap"  # --lora-kernels: overlap | fused | serial
    initial: dict[str, str] = field(default_factory=dict)  # name -> folder, from --lora-paths


class LoRAManager:
    def __init__(self, model: torch.nn.Module, shape: ModelShape, options: LoRAOptions, dtype: torch.dtype,
                 device: torch.device, use_triton: bool) -> None:
        self.options = options
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.pool = LoRAPool(model, shape, options.max_loras_per_batch, options.max_lora_rank, dtype, device,
                             use_triton, options.kernels)
        self.slots = [_Slot() for _ in range(options.max_loras_per_batch)]
        self._slot_index: dict[str, int] = {}  # adapter name -> its device slot
        # CUDA: per slot, an event after the last forward that read it (a swap into it waits for
        # that, not for the whole stream); the previous forward's slots get theirs at the next prepare.
        self._slot_read: dict[int, torch.cuda.Event] = {}
        self._in_flight: set[int] = set()
        self.swaps = 0  # adapters copied into a device slot so far (/server_info: lora.swaps)
        self.swaps_staged = 0  # ... of them from the staging row, copied to the device ahead (`prefetch`)
        self._staged: Registered | None = None  # the adapter in the pool's staging row, not yet in a slot
        self.adapters: dict[str, Registered] = {}
        self._generation = itertools.count()
        self._clock = itertools.count(1)  # monotonic use order (time.monotonic ties on fast steps)
        # Decode under CUDA graphs reads its segments from fixed buffers (order | start | length | slot | row slot).
        self._graph_buf = torch.zeros(0, dtype=torch.int32, device=device)
        self._graph_max_bs = 0
        self._load_initial(options.initial)

    # ---------------------------------------------------------------- registry
    def load(self, name: str, path: str) -> Registered:
        """Read, check and register an adapter (AdapterError: nothing changes)."""
        return self._register(name, path, *self.read_packed(name, path))

    def check_free(self, name: str) -> None:
        if name in self.adapters:
            raise AdapterError(f"LoRA adapter {name!r} is already loaded (from {self.adapters[name].path}); "
                               "unload it first")

    def read_packed(self, name: str, path: str) -> tuple[LoRAAdapter, torch.Tensor]:
        """An adapter read and packed, not yet registered: safe on another thread (background_load.py)."""
        self.check_free(name)
        adapter = read_adapter(name, path, self.shape, self.options.max_lora_rank, self.dtype)  # AdapterError
        return adapter, self.pool.pack(adapter)

    def register(self, name: str, path: str, adapter: LoRAAdapter, packed: torch.Tensor) -> Registered:
        """Register an adapter `read_packed` read (AdapterError if the name was taken meanwhile)."""
        self.check_free(name)
        return self._register(name, path, adapter, packed)

    def _register(self, name: str, path: str, adapter: LoRAAdapter, packed: torch.Tensor) -> Registered:
        entry = Registered(name, str(path), f"{name}#{next(self._generation)}")
        self.adapters[name] = entry
        self._keep_host(entry, packed, busy=set())
        logger.info("LoRA adapter %r loaded from %s (rank %d, %s, %.1f MB)", name, path, adapter.max_rank,
                    ",".join(adapter.config.target_modules), adapter.nbytes / 1e6)
        return entry

    def _load_initial(self, initial: dict[str, str]) -> None:
        """--lora-paths at start-up: read and packed a few at a time on threads (file reads, dtype casts and
        copies release the GIL: 64 adapters of 84 MB took 9 s one by one on the H200's host), registered
        in the given order (the first bad folder raises, as a single load would)."""
        items = list(initial.items())
        workers = max(1, min(LOAD_THREADS, len(items), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as threads:
            for at in range(0, len(items), workers):  # a window at a time: at most `workers` unregistered copies
                window = items[at:at + workers]
                for (name, path), read in zip(window, threads.map(lambda item: self.read_packed(*item), window)):
                    self._register(name, path, *read)

    def unload(self, name: str) -> None:
        """Forget an adapter; the caller checked that no request uses it."""
        if self._staged is self.adapters.pop(name):
            self._staged = None
        index = self._slot_index.pop(name, None)
        if index is not None:
            self.slots[index] = _Slot()

    def _read(self, entry: Registered) -> torch.Tensor:
        return self.pool.pack(read_adapter(entry.name, entry.path, self.shape, self.options.max_lora_rank, self.dtype))

    # ---------------------------------------------------------------- evicted host copies, read back off the loop
    def needs_read(self, name: str) -> bool:
        """Using `name` now would read its folder (evicted from host memory by --max-loaded-loras, in no
        device slot, not staged): the scheduler process reads it on a thread first (background_load.py)."""
        entry = self.adapters.get(name)
        return (entry is not None and entry.host is None and name not in self._slot_index
                and self._staged is not entry)

    def read_back(self, name: str) -> tuple[str, torch.Tensor]:
        """`name`'s host copy read again from its folder, with the load generation it belongs to: safe on
        another thread (nothing of the manager changes; `restore` puts it back on the loop)."""
        entry = self.adapters[name]
        return entry.uid, self._read(entry)

    def restore(self, uid: str, packed: torch.Tensor) -> bool:
        """Keep a host copy `read_back` made, if its adapter is still the one read (not unloaded, nor
        reloaded under its name, meanwhile) and still out of host memory; as recently used (lru), so the
        next read-back does not evict it before its requests take a slot."""
        entry = next((e for e in self.adapters.values() if e.uid == uid), None)
        if entry is None or entry.host is not None:
            return False
        self._keep_host(entry, packed, busy=set())
        entry.used_at = next(self._clock)
        return True

    def _keep_host(self, entry: Registered, packed: torch.Tensor, busy: set[str]) -> None:
        cap = self.options.max_loaded_loras
        held = [e for e in self.adapters.values() if e.host is not None and e is not entry]
        while cap is not None and len(held) >= cap:
            victims = [e for e in held if e.name not in busy] or held
            victim = min(victims, key=self._age)
            logger.info("LoRA adapter %r leaves host memory (--max-loaded-loras %d)", victim.name, cap)
            victim.host = None
            held.remove(victim)
        entry.host = packed
        entry.loaded_at = next(self._clock)

    def _age(self, item: Registered | _Slot) -> float:
        return item.used_at if self.options.eviction_policy == "lru" else item.loaded_at

    def uid(self, name: str) -> str | None:
        entry = self.adapters.get(name)
        return None if entry is None else entry.uid

    def resident(self) -> set[str]:
        """Adapters in a device slot now (using them needs no copy)."""
        return set(self._slot_index)

    def info(self) -> dict:
        return {
            "adapters": {n: e.path for n, e in self.adapters.items()},
            "in_host_memory": sorted(n for n, e in self.adapters.items() if e.host is not None),
            "in_device_slots": [s.name for s in self.slots],
            "pool_bytes": self.pool.nbytes,
            "swaps": self.swaps,
            "swaps_staged": self.swaps_staged,
            "staged": self.staged_adapter(),
        }

    def staged_adapter(self) -> str | None:
        """The adapter in the staging row (copied ahead, not yet in a slot)."""
        return None if self._staged is None else self._staged.name

    def prefetch(self, name: str) -> bool:
        """Copy `name` to the device's staging row now (on the copy stream, beside the forwards), so that
        taking a slot later costs a device-to-device copy. Only from host memory: an adapter evicted from
        it would be read from disk on the scheduler's thread. True when a copy was issued."""
        entry = self.adapters.get(name)
        if entry is None or entry.host is None or name in self._slot_index or self._staged is entry:
            return False
        self.pool.stage(entry.host)
        self._staged = entry
        return True

    # ---------------------------------------------------------------- one batch
    def slot_of(self, name: str, busy: set[str], keep: frozenset[str] = frozenset()) -> int:
        """The device slot holding `name`, swapping it in (from host memory, or its folder) if needed;
        never into a slot of `busy` (this batch's), nor of `keep` (in flight) while another is left. In the
        scheduler process the folder read happened on the lora-load thread before the adapter's requests
        were admitted (`AdapterLoads.hold_unread`); a read here is the in-process path."""
        now = next(self._clock)
        index = self._slot_index.get(name)
        if index is not None:
            self.slots[index].used_at = now
            self.adapters[name].used_at = now
            return index
        index = self._victim(busy, keep)
        entry = self.adapters[name]
        if self._staged is entry:
            self.pool.write(index, None, after=self._slot_read.get(index))
            self._staged = None
            self.swaps_staged += 1
        else:
            if entry.host is None:
                self._keep_host(entry, self._read(entry), busy)
            assert entry.host is not None
            self.pool.write(index, entry.host, after=self._slot_read.get(index))
        self.swaps += 1
        old = self.slots[index].name
        if old is not None:
            del self._slot_index[old]
        self.slots[index] = _Slot(name, now, now)
        self._slot_index[name] = index
        entry.used_at = now
        return index

    def _victim(self, busy: set[str], keep: frozenset[str] = frozenset()) -> int:
        """The slot a swap-in takes: a free one, else by policy one the batch does not use (nor a request
        in flight, where another is left), preferring slots the forward in flight does not read (their copy
        need not wait for it)."""
        free = [i for i, s in enumerate(self.slots) if s.name is None]
        if free:
            return free[0]
        candidates = ([i for i, s in enumerate(self.slots) if s.name not in busy and s.name not in keep]
                      or [i for i, s in enumerate(self.slots) if s.name not in busy])
        if not candidates:
            raise RuntimeError(f"more than {len(self.slots)} LoRA adapters in one batch (--max-loras-per-batch)")
        return min(candidates, key=lambda i: (self._being_read(i), self._age(self.slots[i])))

    def _being_read(self, index: int) -> bool:
        event = self._slot_read.get(index)
        return event is not None and not event.query()

    def prepare(self, batch: ForwardBatch, graph: bool) -> bool:
        """Set the segments every LoRA projection reads in this forward; True when a row uses an
        adapter. False: the projections add nothing, and a decode under CUDA graphs replays the
        base-only graph (no LoRA launches at all). `graph`: the decode replays a CUDA graph (its
        segments go into the graph's buffers)."""
        names = batch.lora_names or []
        wanted = {n for n in names if n is not None}
        self._mark_read()
        if not wanted:
            self.pool.batch.segments = None
            return False
        unknown = wanted - set(self.adapters)
        if unknown:
            raise AdapterError(f"LoRA adapter(s) {sorted(unknown)} are not loaded")
        slots = {n: self.slot_of(n, wanted, batch.lora_keep) for n in sorted(wanted)}
        self._in_flight = set(slots.values())
        per_req_list = [-1 if n is None else slots[n] for n in names]
        if graph:
            self._fill_graph(per_req_list)
            return True
        per_req = torch.tensor(per_req_list, dtype=torch.int32)
        token_slots = per_req if batch.mode is ForwardMode.DECODE else per_req.repeat_interleave(
            torch.tensor(batch.extend_seq_lens_cpu))
        self.pool.batch.segments = LoRASegments.build(token_slots, len(self.slots), self.device)
        return True

    def _mark_read(self) -> None:
        """The previous forward (already enqueued) is the last reader of its slots so far."""
        if self._in_flight and self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
            for index in self._in_flight:
                self._slot_read[index] = done
        self._in_flight = set()

    # ---------------------------------------------------------------- CUDA graphs
    def enable_graphs(self, max_bs: int) -> None:
        """The graphs' segment buffers, every segment unused (slot -1) until a step fills them: the
        graphs are captured over them as they are."""
        self._graph_max_bs = max_bs
        self._graph_buf = torch.zeros(2 * max_bs + 3 * len(self.slots), dtype=torch.int32, device=self.device)
        self._graph_buf[max_bs + 2 * len(self.slots):].fill_(-1)  # slots, then rows' slots: unused

    def graph_segments(self, bs: int) -> LoRASegments:
        """The fixed segments a decode graph of batch size `bs` is captured with."""
        s, m = len(self.slots), self._graph_max_bs
        buf = self._graph_buf
        return LoRASegments(buf[:bs], buf[m:m + s], buf[m + s:m + 2 * s], buf[m + 2 * s:m + 3 * s], bs, [],
                            buf[m + 3 * s:m + 3 * s + bs])

    def use_graph_segments(self, bs: int | None) -> None:
        """Capture: the projections read the graph's buffers; None: the base-only graph, captured
        without any LoRA launch. Host-side only: this runs inside the capture region, and a device
        write here (it once reset the slots to -1) would be recorded and replayed, wiping the
        segments `_fill_graph` wrote before every replay (decode graphs then served no adapter)."""
        self.pool.batch.segments = None if bs is None else self.graph_segments(bs)

    def _fill_graph(self, per_req: list[int]) -> None:
        # each row's slot only where the expand by rows may read it (the longer row costs the host ~15-75 µs a step)
        rows = bool(projection.ROWS_EXPAND_MAX_TOKENS)
        row = graph_segments_row(per_req, len(self.slots), self._graph_max_bs, row_slots=rows)
        host = torch.tensor(row, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._graph_buf[:len(row)].copy_(host, non_blocking=True)  # pinned: never waits for the forward in flight


def model_shape(model: torch.nn.Module, hidden: int, head_dim: int) -> ModelShape:
    """Full (unsharded) in/out features of each LoRA target of a Llama-family model."""
    attn = model.layers[0].self_attn
    q, kv = attn.num_heads * head_dim, attn.num_kv_heads * head_dim
    inter = model.layers[0].mlp.down_proj.in_features
    return ModelShape(num_layers=len(model.layers), features={
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)})



def build_lora_manager(args: "ServerArgs", model: torch.nn.Module, hidden: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> LoRAManager:
    """The manager for --enable-lora, with the --lora-paths adapters read and checked."""
    from radixlm.runtime.lora.adapter import declared_max_rank

    initial = args.lora_adapters()
    rank = args.max_lora_rank or max((declared_max_rank(name, path) for name, path in initial.items()), default=64)
    options = LoRAOptions(args.max_loras_per_batch, args.max_loaded_loras, rank, args.lora_eviction_policy,
                          args.lora_kernels, initial)
    manager = LoRAManager(model, model_shape(model, hidden, head_dim), options, dtype, device,
                          use_triton=args.attention_backend == "triton")
    logger.info("LoRA: %d adapter(s), %d device slots of rank %d (%.0f MB)", len(initial),
                options.max_loras_per_batch, rank, manager.pool.nbytes / 1e6)
    started = time.perf_counter()
    sizes = warm_up_prefill_kernels(manager.pool, args.max_prefill_tokens) if device.type == "cuda" else []
    if sizes:  # Triton's JIT at start-up, not inside the first requests
        logger.info("LoRA: prefill kernels compiled for %s rows in %.1f s", sizes, time.perf_counter() - started)
    return manager
