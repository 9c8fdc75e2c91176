"""The LoRA options of ServerArgs (group "lora"), their checks and --lora-paths parsed.

A part of ServerArgs, which inherits it: `server_args.py` keeps the list of every option and `resolve`.
"""
from __future__ import annotations

from dataclasses import dataclass

from radixlm.runtime.flag_spec import option


@dataclass(frozen=True, kw_only=True)
class LoRAArgs:
    enable_lora: bool = option(False, "lora", "serve LoRA adapters (PEFT format) on top of the base model; "
                              "implied by --lora-paths", bool)
    lora_paths: tuple[str, ...] | None = option(
        None, "lora", "adapters loaded at start-up: name=folder (or a folder, named by its path), each a PEFT "
        "adapter_config.json + adapter_model.safetensors", str, multiple=True, default_text="none")
    max_loras_per_batch: int = option(8, "lora", "at most this many different adapters in one batch (device "
                                     "slots, each one adapter at --max-lora-rank: ~84 MB at rank 16 on an 8B "
                                     "model; the base model takes none). A batch holds only the requests of "
                                     "this many adapters: when requests spread over more, raise it as memory "
                                     "allows", int, minimum=1)
    max_loaded_loras: int | None = option(
        None, "lora", "at most this many adapters in host memory (>= --max-loras-per-batch); others are read "
        "again from their folder when a request needs them", int, minimum=1, default_text="no limit")
    max_lora_rank: int | None = option(None, "lora", "the largest adapter rank accepted (sizes the device slots)",
                                      int, minimum=1, default_text="the largest rank in --lora-paths, else 64")
    lora_eviction_policy: str = option("lru", "lora", "which adapter leaves a device slot or host memory first: "
                                      "lru (least recently used) or fifo (first loaded)", str,
                                      choices=("lru", "fifo"))
    lora_kernels: str = option("stacked", "lora", "how a projection's LoRA update runs on CUDA: stacked (from 8 "
                              "to 1024 rows the shrink runs inside the base GEMM, its weight holding every slot's A "
                              "under it, one expand after it; one row too where the layer has an M = 1 GEMV, which "
                              "then runs over the stacked weight; unquantized, unsharded layers without bias; fewer rows "
                              "and other layers as overlap, more rows as serial), overlap (the shrink on a side stream while the base "
                              "GEMM runs, the expand there too up to 256 rows, then one add), fused (shrink and "
                              "expand in one launch at decode sizes, <= 32 rows) or serial (shrink then expand "
                              "after the GEMM)", str,
                              choices=("overlap", "fused", "serial", "stacked"))
    lora_prefill_chunk: int = option(0, "lora", "while requests want more adapters than --max-loras-per-batch (a "
                                    "request then decodes only while its adapter holds a slot, so decode steps "
                                    "bound the run), prefill in chunks of at most this many tokens, each carrying "
                                    "the decode rows (saving a decode step); 0: off", int, minimum=0)

    def _check_lora(self, ranks: int) -> None:
        """`ranks`: tp_size x pp_size."""
        if isinstance(self.lora_paths, list):
            object.__setattr__(self, "lora_paths", tuple(self.lora_paths))
        if self.lora_paths:
            object.__setattr__(self, "enable_lora", True)
            self.lora_adapters()  # each entry well-formed, names unique
        if not self.enable_lora:
            return
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ValueError(f"max_loaded_loras: {self.max_loaded_loras} is below max_loras_per_batch "
                             f"({self.max_loras_per_batch})")
        if ranks > 1:
            raise ValueError("enable_lora: LoRA adapters are served with tp_size 1 and pp_size 1 only (for now)")

    def lora_adapters(self) -> dict[str, str]:
        """--lora-paths as name -> folder."""
        out: dict[str, str] = {}
        for entry in self.lora_paths or ():
            name, sep, path = entry.partition("=")
            if not sep:
                name = path = entry
            if not name or not path:
                raise ValueError(f"lora_paths: {entry!r} is not name=folder")
            if name in out:
                raise ValueError(f"lora_paths: the name {name!r} is given twice")
            out[name] = path
        return out
