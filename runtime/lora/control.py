"""Loading and unloading adapters while serving: the scheduler's side of /load_lora_adapter and
/unload_lora_adapter. Unloading refuses while any request (waiting, running or partly prefilled)
uses the adapter: the caller is told how many, and may retry once they finish."""
from __future__ import annotations

from typing import TYPE_CHECKING

from radixlm.runtime.io_struct import ControlReq, ControlResp
from radixlm.runtime.lora.adapter import AdapterError
from radixlm.runtime.lora.admission import requests_using

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler


def handle_lora_control(sched: "Scheduler", msg: ControlReq) -> ControlResp | None:
    lora = sched.runner.lora
    name = msg.payload.get("lora_name")
    if lora is None:
        return ControlResp(msg.request_id, False, {"message": "LoRA is not enabled on this server (--enable-lora)",
                                                   "param": "lora_name"})
    if msg.kind == "load_lora_adapter" and sched.adapter_loads is not None:
        return sched.adapter_loads.start(msg)  # read on a thread; replied from the loop (background_load.py)
    if msg.kind == "load_lora_adapter":
        try:
            lora.load(str(name), str(msg.payload.get("lora_path")))
        except AdapterError as exc:
            return ControlResp(msg.request_id, False, {"message": str(exc), "param": "lora_path"})
        return ControlResp(msg.request_id, True, {"loaded_adapters": lora.info()["adapters"]})
    if name not in lora.adapters:
        return ControlResp(msg.request_id, False, {"message": f"unknown LoRA adapter {name!r}", "param": "lora_name",
                                                   "status": 404})
    busy = requests_using(str(name), (sched.waiting, sched.running, sched.partial))
    if busy:
        return ControlResp(msg.request_id, False, {
            "message": f"LoRA adapter {name!r} is in use by {busy} request(s) in flight; not unloaded "
                       "(retry once they finish)", "param": "lora_name", "status": 409})
    lora.unload(str(name))
    return ControlResp(msg.request_id, True, {"loaded_adapters": lora.info()["adapters"]})
