"""/load_lora_adapter's file read off the scheduler's thread.

Reading an adapter's safetensors and packing it into a slot row took 43-47 ms of the scheduler's
loop for a 78-MB rank-64 adapter of the default model (2-core VM, page cache warm), and grows with
the adapter and the disk: every running request's decoding waited. The scheduler process hands the
read to one background thread (file reads and copies release the GIL, as start-up's parallel reads
rely on) and, on its loop, registers each finished read and sends its reply; the front awaits the
reply by request id, as before. In-process callers of Scheduler.handle (tests) keep the
synchronous load.

The same thread reads back an adapter that --max-loaded-loras evicted from host memory, which
`LoRAManager.slot_of` otherwise read inside the step that first used it again: prefill admission
holds that adapter's requests out of the batch (as requests whose grammar still compiles are held)
while its folder is read, one adapter at a time, and admits them once the copy is back; a read
that fails ends them with an error naming the adapter and its folder.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from radixlm.runtime.io_struct import ControlReq, ControlResp, FinishReason
from radixlm.runtime.lora.adapter import AdapterError

if TYPE_CHECKING:
    import torch

    from radixlm.runtime.lora.manager import LoRAManager
    from radixlm.runtime.request import Req
    from radixlm.runtime.scheduler import Scheduler

THREAD_NAME = "lora-load"


class AdapterLoads:
    def __init__(self, lora: LoRAManager) -> None:
        self.lora = lora
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
        self._pending: list[tuple[ControlReq, Future]] = []
        self._reading: tuple[str, Future[tuple[str, torch.Tensor]]] | None = None  # an evicted adapter read back

    @property
    def pending(self) -> bool:
        return bool(self._pending) or self._reading is not None

    def start(self, msg: ControlReq) -> ControlResp | None:
        """Queue the read of `msg`'s adapter; a refusal known at once (the name is taken) is answered now."""
        name, path = str(msg.payload.get("lora_name")), str(msg.payload.get("lora_path"))
        try:
            self.lora.check_free(name)
        except AdapterError as exc:
            return ControlResp(msg.request_id, False, {"message": str(exc), "param": "lora_name"})
        self._pending.append((msg, self._thread.submit(self.lora.read_packed, name, path)))
        return None

    def finished(self) -> list[ControlResp]:
        """Register the adapters read since the last call (on the caller's thread, the scheduler's) and
        answer their requests, in the order they came."""
        replies: list[ControlResp] = []
        while self._pending and self._pending[0][1].done():
            msg, read = self._pending.pop(0)
            name, path = str(msg.payload.get("lora_name")), str(msg.payload.get("lora_path"))
            try:
                self.lora.register(name, path, *read.result())  # AdapterError: a bad folder, or the name taken meanwhile
            except AdapterError as exc:
                replies.append(ControlResp(msg.request_id, False, {"message": str(exc), "param": "lora_path"}))
                continue
            replies.append(ControlResp(msg.request_id, True, {"loaded_adapters": self.lora.info()["adapters"]}))
        return replies

    def hold_unread(self, sched: Scheduler, candidates: list[Req]) -> list[Req]:
        """`candidates` without the requests whose adapter is out of host memory (evicted by
        --max-loaded-loras, in no device slot): the first such adapter's folder is read back on the thread,
        and its requests pass once the copy is back. Runs at each prefill admission, on the loop."""
        failed = self._collect(sched)
        if failed:
            candidates = [r for r in candidates if r.lora_name != failed]
        lora = self.lora
        unread = {r.lora_name for r in candidates if r.lora_name is not None and lora.needs_read(r.lora_name)}
        if not unread:
            return candidates
        if self._reading is None:
            name = next(str(r.lora_name) for r in candidates if r.lora_name in unread)
            self._reading = (name, self._thread.submit(lora.read_back, name))
        return [r for r in candidates if r.lora_name not in unread]

    def _collect(self, sched: Scheduler) -> str | None:
        """A finished read-back: its copy kept in host memory, or (the folder no longer reads) the waiting
        requests of that adapter ended with the reason, and its name returned."""
        if self._reading is None or not self._reading[1].done():
            return None
        (name, read), self._reading = self._reading, None
        try:
            uid, packed = read.result()
        except Exception as exc:  # noqa: BLE001 - a folder that no longer reads fails its requests, not the loop
            path = self.lora.adapters[name].path if name in self.lora.adapters else "?"
            message = (f"LoRA adapter {name!r} could not be read back from {path} after --max-loaded-loras "
                       f"evicted it from host memory: {exc}")
            for req in [r for r in sched.waiting if r.lora_name == name]:
                sched.waiting.remove(req)
                sched._finish(req, FinishReason.abort(message, status_code=500))
            return name
        self.lora.restore(uid, packed)
        return None
