"""/load_lora_adapter's file read off the scheduler's thread.

Reading an adapter's safetensors and packing it into a slot row took 43-47 ms of the scheduler's
loop for a 78-MB rank-64 adapter of the default model (2-core VM, page cache warm), and grows with
the adapter and the disk: every running request's decoding waited. The scheduler process hands the
read to one background thread (file reads and copies release the GIL, as start-up's parallel reads
rely on) and, on its loop, registers each finished read and sends its reply; the front awaits the
reply by request id, as before. In-process callers of Scheduler.handle (tests) keep the
synchronous load.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from radixlm.runtime.io_struct import ControlReq, ControlResp
from radixlm.runtime.lora.adapter import AdapterError

if TYPE_CHECKING:
    from radixlm.runtime.lora.manager import LoRAManager

THREAD_NAME = "lora-load"


class AdapterLoads:
    def __init__(self, lora: LoRAManager) -> None:
        self.lora = lora
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
        self._pending: list[tuple[ControlReq, Future]] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

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
