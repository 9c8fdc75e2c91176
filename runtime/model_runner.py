"""Owns the model weights, the KV pools and the attention backend; runs one forward pass.

With several ranks per replica (TP / PP) every rank has a ModelRunner holding its shard and its own
KV pool (its KV heads, its layers); rank 0's forward first sends the batch to the others."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from radixlm.kernels import get_cpu_kernel_ops, get_kernel_ops
from radixlm.runtime.attention import PagedAttentionBackend
from radixlm.runtime.cascade import CascadePlanner
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool, resolve_kv_cache_dtype
from radixlm.runtime.model_config import ModelConfig, resolve_dtype
from radixlm.runtime.models.llama import MODEL_CLASSES, LlamaForCausalLM, rope_cos_sin_cache
from radixlm.runtime.parallel.state import agree_min, get_parallel_state, tp_rank_size
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.weight_loader import init_dummy_weights, iter_safetensors

logger = logging.getLogger(__name__)

_CPU_MAX_TOTAL_TOKENS = 65536


def quantized_summary(model: torch.nn.Module) -> str:
    """'N layers int4x1[Q4_1], ... (X MiB)' for the log line."""
    formats: dict[str, int] = {}
    nbytes = 0
    for module in model.modules():
        quantized = getattr(module, "quantized", None)
        if quantized is not None:
            formats[quantized.format] = formats.get(quantized.format, 0) + 1
            nbytes += quantized.nbytes
    listed = ", ".join(f"{count} x {name}" for name, count in sorted(formats.items()))
    return f"{listed or 'no layer'} ({nbytes / 2**20:.0f} MiB)"


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter plus every quantized weight (whose float parameter is empty)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = {id(q): q.nbytes for m in model.modules() if (q := getattr(m, "quantized", None)) is not None}
    return params + sum(quantized.values())


def exact_float32_matmuls() -> None:
    """float32 weights mean float32 arithmetic: no TF32 in cuBLAS or cuDNN (process-wide; a scheduler
    process serves one model). The Triton kernels pick exact dots for float32 inputs themselves."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class ModelRunner:
    def __init__(self, args: ServerArgs, model_dir: Path, reserve: tuple[int, int] = (0, 0)) -> None:
        """`reserve`: (bytes, bytes per KV token) of GPU memory to leave for a draft model
        (speculative decoding) when sizing the KV pool from --mem-fraction-static."""
        if not args.resolved:
            raise ValueError("ModelRunner needs resolved options: ServerArgs(...).resolve()")
        self.args = args
        parallel = get_parallel_state()
        self.device = parallel.device if parallel else torch.device(args.device)
        if self.device.type == "cpu" and args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
        self.model_config = ModelConfig.from_pretrained(model_dir)
        mc = self.model_config
        self.dtype = resolve_dtype(args.dtype, mc, self.device)
        if self.dtype == torch.float32 and self.device.type == "cuda":
            exact_float32_matmuls()
        self.context_len = args.context_length or mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        torch.manual_seed(args.random_seed)
        from radixlm.runtime.gguf_weights import has_gguf_blocks  # imports gguf
        from radixlm.runtime.quantization.checkpoint import read_checkpoint_quantization
        from radixlm.runtime.quantization.select import resolve_quantization

        gguf_blocks = args.load_format != "dummy" and has_gguf_blocks(model_dir)
        # With dummy weights a 4-bit config still applies: the random weights are quantized in its scheme.
        ckpt = read_checkpoint_quantization(model_dir)
        self.checkpoint_quantization = None if args.load_format == "dummy" and (ckpt is None or ckpt.w4 is None) else ckpt
        self.quantization = resolve_quantization(args.quantization, args.dtype, self.device, gguf_blocks,
                                                 parallel is not None, self.checkpoint_quantization, tp_rank_size()[1])
        self.model = self._load_model(model_dir)
        if args.speculative_algorithm == "EAGLE3":  # the draft head reads these layers' hidden states
            from radixlm.runtime.speculative.eagle_head import target_aux_layers

            self.model.aux_layers = target_aux_layers(args, mc.num_layers)
        self.kv_cache_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, self.dtype)
        self.lora = None  # LoRAManager with --enable-lora: its device slots are allocated before the KV pool
        if args.enable_lora:
            from radixlm.runtime.lora.manager import build_lora_manager

            self.lora = build_lora_manager(args, self.model, mc.hidden_size, mc.head_dim, self.dtype, self.device)
        self.reserve = reserve

        self.max_total_tokens = agree_min(self._kv_capacity())  # every rank holds the same slots
        self.max_running_requests = args.max_running_requests or min(
            1024 if self.device.type == "cuda" else 256, max(self.max_total_tokens // 16, 8)
        )
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests + 8, self.context_len + 8, self.device)
        k_scales, v_scales = self._kv_scales()
        self.kv_pool = TokenToKVPool(  # this rank's layers and KV heads
            self.max_total_tokens, len(self.model.layers), self.model.tp.kv_heads, mc.head_dim, self.kv_cache_dtype,
            self.device, k_scales=k_scales, v_scales=v_scales,
        )
        self.weights_bytes = model_weight_bytes(self.model)
        self.kv_pool_bytes = self.max_total_tokens * TokenToKVPool.bytes_per_token(
            len(self.model.layers), self.model.tp.kv_heads, mc.head_dim, self.kv_cache_dtype)
        self.attn_backend = self._make_attention_backend()
        self.cascade = self._make_cascade_planner(parallel is not None)
        self.graph_runner = None
        if not args.disable_cuda_graph and self.model.stage.size == 1:  # stages exchange tensors between graphs: not captured
            from radixlm.runtime.cuda_graph_runner import CudaGraphRunner

            max_bs = min(args.cuda_graph_max_bs or self.max_running_requests, self.max_running_requests)
            if self.lora is not None:
                self.lora.enable_graphs(max_bs)
            self.graph_runner = CudaGraphRunner(self, max_bs, self.req_to_token_pool.pad_row)
        if self.device.type == "cuda":  # the sampler's Triton argmax compiles here, not in the first request's TTFT
            from radixlm.runtime.sampler import greedy_argmax

            greedy_argmax(torch.zeros(1, self.vocab_size, dtype=torch.float32, device=self.device))
        self.channel = None
        if parallel is not None:
            from radixlm.runtime.parallel.worker import StepChannel

            self.channel = StepChannel(self, parallel)
        logger.info(
            "model %s on %s (%s): weights %.2f GB (quantization %s: %s), KV pool %d tokens (%.2f GB, %s, %d B/token), "
            "%d running requests max, context %d%s",
            mc.architecture, self.device, self.dtype, self.weights_bytes / 1e9, self.quantization,
            quantized_summary(self.model), self.max_total_tokens, self.kv_pool_bytes / 1e9,
            str(self.kv_cache_dtype).removeprefix("torch."), self.kv_pool_bytes // max(self.max_total_tokens, 1),
            self.max_running_requests, self.context_len, self._device_memory_note(),
        )

    def _load_model(self, model_dir: Path) -> LlamaForCausalLM:
        cls = MODEL_CLASSES[self.model_config.architecture]
        with torch.device("meta"):  # no host-side init of weights that are overwritten anyway
            model = cls(self.model_config, self.context_len + 8)
        model = model.to(self.dtype).to_empty(device=self.device)
        model.cos_sin_cache = rope_cos_sin_cache(self.model_config, self.context_len + 8).to(self.device)
        w4 = self.checkpoint_quantization.w4 if self.checkpoint_quantization is not None else None
        if self.args.load_format == "dummy":
            init_dummy_weights(model, self.args.random_seed)
            if w4 is not None:
                from radixlm.runtime.quantization.w4_formats import quantize_layers_w4

                quantize_layers_w4(model.layers, w4.group_size, w4.symmetric, w4.method)
        elif self.quantization == "gguf":
            from radixlm.runtime.gguf_weights import iter_gguf_weights

            model.load_weights(iter_gguf_weights(model_dir))
            from radixlm.runtime.quantization.int4_cpu import DENSE_MIN_ROWS, keep_dense_copies

            quantized = [q for m in model.modules() if (q := getattr(m, "quantized", None)) is not None]
            dense = keep_dense_copies(quantized, _available_ram_bytes())
            logger.info("GGUF weights kept quantized: %s%s", quantized_summary(model),
                        f"; dense bfloat16 copies ({dense / 2**20:.0f} MiB) for inputs of >= {DENSE_MIN_ROWS} rows"
                        if dense else "")
        else:
            # Several ranks: each reads only its share of the checkpoint.
            model.load_weights(iter_safetensors(model_dir, lazy=get_parallel_state() is not None), w4=w4)
        if self.quantization == "fp8" and self.checkpoint_quantization is None:
            from radixlm.runtime.quantization.fp8 import quantize_layers_online

            quantize_layers_online(model.layers)
        if self.device.type == "cuda":  # quantized layers dropped their float weights: hand that memory back
            torch.cuda.empty_cache()  # before the KV pool is sized from what is free
        model.eval()
        return model

    def _kv_scales(self) -> tuple[list[float], list[float]]:
        """Per-layer FP8 KV scales: the checkpoint's where it has them, else 1.0 (unused for a float pool)."""
        attn = [layer.self_attn for layer in self.model.layers]
        return [a.kv_scales.get("k", 1.0) for a in attn], [a.kv_scales.get("v", 1.0) for a in attn]

    def _device_memory_note(self) -> str:
        if self.device.type != "cuda":
            return ""
        free, total = torch.cuda.mem_get_info(self.device)
        return f"; GPU memory {(total - free) / 1e9:.1f} of {total / 1e9:.1f} GB in use"

    def _kv_capacity(self) -> int:
        mc = self.model_config
        per_token = TokenToKVPool.bytes_per_token(len(self.model.layers), self.model.tp.kv_heads, mc.head_dim,
                                                  self.kv_cache_dtype)
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.args.mem_fraction_static - (total - free) - self.reserve[0]
            per_token += self.reserve[1]  # the draft model's pool holds as many tokens
            if budget < per_token * 1024:
                raise RuntimeError("mem_fraction_static: too little GPU memory left for the KV cache")
            return int(budget // per_token)
        budget = _available_ram_bytes() * 0.25
        return int(max(min(budget // per_token, _CPU_MAX_TOTAL_TOKENS), 1024))

    def _make_attention_backend(self) -> PagedAttentionBackend:
        triton = self.args.attention_backend == "triton"
        pdl = False
        if triton and self.device.type == "cuda":  # (kernels.gdc imports triton: not on CPU-only installs)
            from radixlm.kernels.gdc import enabled as pdl_enabled
            from radixlm.runtime.quantization.base import QuantizedWeight, set_decode_pdl

            quantized = any(isinstance(getattr(m, "quantized", None), QuantizedWeight) for m in self.model.modules())
            pdl = pdl_enabled(self.args.decode_pdl, self.device, quantized)
            # the quantized linears' M = 1 kernels (4-bit GEMV, FP8 small-M) too, the 4-bit gate_up's SiLU epilogue
            # and the 4-bit decode's split norms
            from radixlm.runtime.quantization.w4a16 import silu_epilogue_enabled, split_norm_enabled

            set_decode_pdl(self.model, pdl, silu_epilogue_enabled(self.args.decode_silu_epilogue),
                           split_norm_enabled(self.args.decode_split_norm))
            from radixlm.runtime.dense_gemv import attach_dense_gemv, norm_fusion_enabled

            norm = norm_fusion_enabled(self.args.decode_gemv_norm)
            gemv = attach_dense_gemv(self.model, pdl, norm)  # bf16 M = 1 shapes measured faster than cuBLAS
            if gemv:
                logger.info("bf16 M = 1 GEMV kernel on %d linear layers (e.g. %s)", len(gemv), gemv[0])
            from radixlm.runtime.dense_small_m import attach_dense_small_m

            small = attach_dense_small_m(self.model, pdl)  # 2..16 rows (verify steps) where measured faster
            if small:
                logger.info("bf16 small-M kernel on %d linear layers (e.g. %s)", len(small), small[0])
            from radixlm.runtime.dense_row_blocks import attach_row_blocks, resolve_rows

            rows = resolve_rows(self.args.gemm_row_block)  # prefill chunks' products over weights larger than L2
            blocked = attach_row_blocks(self.model, rows, torch.cuda.get_device_properties(self.device).L2_cache_size)
            if blocked:
                logger.info("products of more than %d rows in row blocks on %d linear layers (e.g. %s)", rows,
                            len(blocked), blocked[0])
            if self.lora is not None:  # the stacked LoRA weights' one-row products take the same GEMVs
                self.lora.pool.attach_gemv(pdl)
        ops = get_kernel_ops(triton, pdl)
        if self.device.type == "cpu" and ops.name == "torch":  # the same math in fewer dispatches
            ops = get_cpu_kernel_ops()
        self.model.ops = ops
        sm_scale = self.model_config.head_dim**-0.5
        self.model.decode_stack = None
        if ops.name == "cpu" and self.dtype == torch.float32 and self.lora is None and not self.args.disable_cpu_decode_stack:
            from radixlm.runtime.cpu_decode_step import CpuDecodeStack

            self.model.decode_stack = CpuDecodeStack.build(self.model, self.kv_pool, self.req_to_token_pool, sm_scale)
        return PagedAttentionBackend(ops, self.req_to_token_pool, self.kv_pool, sm_scale)

    def _make_cascade_planner(self, parallel: bool) -> CascadePlanner | None:
        """Shared-prefix decode attention, where rows can share radix-tree prefixes. Not with several
        ranks (the step channel does not carry the layout) nor without the radix cache (nothing shared)."""
        mode = self.args.cascade_attention
        if mode == "off" or self.args.disable_radix_cache or parallel:
            return None
        if self.args.attention_backend != "triton" and mode != "on":
            return None
        mc = self.model_config
        return CascadePlanner.for_model(self.model.tp.heads, self.model.tp.kv_heads, mc.head_dim,
                                        torch.empty(0, dtype=self.kv_cache_dtype).element_size(), self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, staged: tuple[int, int, bool, bool, bool] | None = None) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] in float32. `staged`: what `stage(batch)` returned."""
        if staged is not None:
            assert self.graph_runner is not None
            return self.graph_runner.launch(staged)
        if self.channel is not None:  # rank 0 of several: the other ranks run the batch with this one
            return self.channel.drive(batch)
        return self.forward_local(batch)

    @torch.inference_mode()
    def stage(self, batch: ForwardBatch) -> tuple[int, int, bool, bool, bool] | None:
        """A decode batch's inputs copied into its CUDA graph's buffers now, stream-ordered after the
        forward in flight, for `forward(batch, staged)` to replay at once (one rank, no adapters); None
        where the batch would not replay a graph."""
        if self.channel is not None or self.lora is not None or self.graph_runner is None:
            return None
        return self.graph_runner.stage(batch) if self.graph_runner.can_run(batch) else None

    @torch.inference_mode()
    def forward_local(self, batch: ForwardBatch) -> torch.Tensor:
        """The forward of a rank holding every layer (TP collectives run inside the model)."""
        graph = self.graph_runner is not None and self.graph_runner.can_run(batch)
        adapters = self.lora is not None and self.lora.prepare(batch, graph)
        if graph:
            return self._sampled_rows(batch, self.graph_runner.replay(batch, lora=adapters))
        self.attn_backend.begin_forward(batch)
        hidden = self.model(batch, self.attn_backend)
        return self._sampled_rows(batch, self.model.compute_logits(hidden))

    @staticmethod
    def _sampled_rows(batch: ForwardBatch, logits: torch.Tensor) -> torch.Tensor:
        """A decode step's logits are every row's; where some rows only compute KV (grammar-forced
        tokens riding in the step: runtime/forced_rows.py), the rows of `logits_indices`."""
        wanted = batch.logits_indices.shape[0]
        return logits if logits.shape[0] == wanted else logits.index_select(0, batch.logits_indices)
