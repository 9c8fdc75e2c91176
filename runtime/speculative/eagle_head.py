"""An EAGLE-3 draft head as published: its config, its weights, and its forward over a paged KV pool.

The layout is the one the `speculators` package (speculators/models/eagle3) saves: config.json with
`speculators_model_type: "eagle3"`, the decoder layer's shapes in `transformer_layer_config` (llama
or qwen3), `draft_vocab_size`, the target layers whose hidden states feed it
(`eagle_aux_hidden_state_layer_ids`; default [2, L // 2, L - 3]) and its norm flags; safetensors
with `fc.weight` (target hidden x n_aux -> hidden), `layers.0.*` (q/k/v take 2 x hidden:
[embedding, hidden]), `layers.0.hidden_norm`, `norm`, `lm_head` over the draft vocabulary, `d2t`
(draft id -> target id offset) and `t2d`, and `embed_tokens` only when the head has its own (else the
target's is shared). The original EAGLE-3 release's layout (`LlamaForCausalLMEagle3`: the layer's
config at the top level, weights under `midlayer.`) is read too.

One layer, as speculators' Eagle3FirstLayerMixin computes it: the token's embedding goes through
`input_layernorm`, the hidden state through `hidden_norm`; attention reads their concatenation;
the residual is the hidden state (normed with `norm_before_residual`); then the MLP. Its output
(pre-norm, or normed with `norm_output`) is the hidden state of the next draft step.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.functional import linear

from radixlm.kernels import KernelOps
from radixlm.runtime.attention import PagedAttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.model_config import ModelConfig
from radixlm.runtime.models.llama import RMSNormWeight
from radixlm.runtime.server_args import ServerArgs

LEGACY_ARCHITECTURE = "LlamaForCausalLMEagle3"
LAYER_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class EagleHeadConfig:
    layer: ModelConfig  # the decoder layer's shapes; vocab_size is the target's
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...] | None  # None: the default for the target's depth
    target_hidden_size: int
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    weight_prefix: str = "layers.0."

    @classmethod
    def from_folder(cls, head_dir: Path) -> "EagleHeadConfig":
        path = Path(head_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"speculative_draft_model_path: {head_dir} has no config.json")
        cfg = json.loads(path.read_text())
        if cfg.get("speculators_model_type") == "eagle3":
            layer_cfg = dict(cfg.get("transformer_layer_config") or {})
            layer_type = layer_cfg.get("model_type", "llama")
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"speculative_draft_model_path: EAGLE-3 layer type {layer_type!r} is not supported "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
            layer_cfg["architectures"] = [LAYER_TYPES[layer_type]]
            prefix = "layers.0."
            if layer_cfg.get("num_hidden_layers", 1) != 1:
                raise ValueError("speculative_draft_model_path: EAGLE-3 heads of more than one layer are not supported")
        elif LEGACY_ARCHITECTURE in (cfg.get("architectures") or []):
            layer_cfg = {**cfg, "architectures": ["LlamaForCausalLM"]}
            prefix = "midlayer."
        else:
            raise ValueError(f"speculative_draft_model_path: {head_dir} is not an EAGLE-3 head (config.json has neither "
                             f"speculators_model_type 'eagle3' nor architecture {LEGACY_ARCHITECTURE!r})")
        layer = ModelConfig.from_dict(layer_cfg)
        aux = cfg.get("eagle_aux_hidden_state_layer_ids") or (cfg.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids")
        return cls(
            layer=layer, draft_vocab_size=int(cfg.get("draft_vocab_size") or layer.vocab_size),
            aux_layer_ids=tuple(int(i) for i in aux) if aux else None,
            target_hidden_size=int(cfg.get("target_hidden_size") or layer.hidden_size),
            norm_before_residual=bool(cfg.get("norm_before_residual", False)),
            norm_before_fc=bool(cfg.get("norm_before_fc", False)), fc_norm=bool(cfg.get("fc_norm", False)),
            norm_output=bool(cfg.get("norm_output", False)), weight_prefix=prefix,
        )

    def aux_layers(self, target_layers: int) -> tuple[int, ...]:
        """The target layers whose input hidden states (the residual stream before the layer) feed the head."""
        ids = self.aux_layer_ids or (2, target_layers // 2, target_layers - 3)
        if min(ids) < 0 or max(ids) >= target_layers:
            raise ValueError(f"speculative_draft_model_path: eagle_aux_hidden_state_layer_ids {list(ids)} are not "
                             f"layers of the target (it has {target_layers})")
        return tuple(ids)

    def param_count(self, has_embedding: bool) -> int:
        c = self.layer
        h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        n_aux = len(self.aux_layer_ids or (0, 0, 0))
        count = n_aux * self.target_hidden_size * h + 2 * h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size
        return count + self.draft_vocab_size * h + (c.vocab_size * h if has_embedding else 0)


def head_folder(args: ServerArgs) -> Path:
    from radixlm.runtime.model_source import resolve_model_path

    assert args.speculative_draft_model_path is not None
    return resolve_model_path(args.speculative_draft_model_path, progress=False, download_dir=args.download_dir)


def target_aux_layers(args: ServerArgs, target_layers: int) -> tuple[int, ...]:
    """The target layers whose hidden states the forward must keep for the head of `args`."""
    return EagleHeadConfig.from_folder(head_folder(args)).aux_layers(target_layers)


class EagleHead(nn.Module):
    def __init__(self, cfg: EagleHeadConfig, has_embedding: bool) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.layer
        h = c.hidden_size
        self.eps = c.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        n_aux = len(cfg.aux_layer_ids or (0, 0, 0))

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape), requires_grad=False)

        self.fc = param(h, n_aux * cfg.target_hidden_size)
        self.input_norm = RMSNormWeight(n_aux * cfg.target_hidden_size) if cfg.norm_before_fc else None
        self.fc_norms = nn.ModuleList([RMSNormWeight(cfg.target_hidden_size) for _ in range(n_aux)]) if cfg.fc_norm else None
        self.qkv_proj = param(self.q_size + 2 * self.kv_size, 2 * h)
        self.qkv_bias = param(self.q_size + 2 * self.kv_size) if c.attention_bias else None
        self.o_proj = param(h, self.q_size)
        self.q_norm = RMSNormWeight(c.head_dim) if c.qk_norm else None
        self.k_norm = RMSNormWeight(c.head_dim) if c.qk_norm else None
        self.gate_up_proj = param(2 * c.intermediate_size, h)
        self.down_proj = param(h, c.intermediate_size)
        self.input_layernorm = RMSNormWeight(h)
        self.hidden_norm = RMSNormWeight(h)
        self.post_attention_layernorm = RMSNormWeight(h)
        self.norm = RMSNormWeight(h)
        self.lm_head = param(cfg.draft_vocab_size, h)
        self.embed_tokens = param(c.vocab_size, h) if has_embedding else None
        self.register_buffer("d2t", None if cfg.draft_vocab_size == c.vocab_size else
                             torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))

    # ---------------------------------------------------------------- weights
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the checkpoint's tensors (HF names) into the fused layout; refuse unknown or missing ones."""
        c, prefix = self.cfg.layer, self.cfg.weight_prefix
        q, kv, inter = self.q_size, self.kv_size, c.intermediate_size
        fused = {"self_attn.q_proj.weight": ("qkv_proj", 0, q), "self_attn.k_proj.weight": ("qkv_proj", q, kv),
                 "self_attn.v_proj.weight": ("qkv_proj", q + kv, kv), "self_attn.q_proj.bias": ("qkv_bias", 0, q),
                 "self_attn.k_proj.bias": ("qkv_bias", q, kv), "self_attn.v_proj.bias": ("qkv_bias", q + kv, kv),
                 "mlp.gate_proj.weight": ("gate_up_proj", 0, inter), "mlp.up_proj.weight": ("gate_up_proj", inter, inter),
                 "self_attn.o_proj.weight": ("o_proj", None, None), "mlp.down_proj.weight": ("down_proj", None, None),
                 "self_attn.q_norm.weight": ("q_norm.weight", None, None),
                 "self_attn.k_norm.weight": ("k_norm.weight", None, None)}
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("verifier_") or name == "t2d":  # training-only / the inverse map: unused here
                continue
            if name == "d2t":
                if self.d2t is None or tuple(tensor.shape) != tuple(self.d2t.shape):
                    raise ValueError(f"speculative_draft_model_path: d2t has shape {tuple(tensor.shape)}, the head's "
                                     f"draft vocabulary is {self.cfg.draft_vocab_size} of {c.vocab_size}")
                self.d2t.copy_(tensor.to(torch.int64))
                loaded.add("d2t")
                continue
            target, rows = name, None
            if name.startswith(prefix):
                local = name[len(prefix):]
                if local not in fused and not local.endswith("norm.weight"):
                    raise ValueError(f"speculative_draft_model_path: unexpected weight {name!r}")
                target, start, count = fused.get(local, (local, None, None))
                rows = None if start is None else (start, count)
            elif name == "fc.weight":
                target = "fc"
            elif name in ("lm_head.weight", "embed_tokens.weight"):
                target = name.removesuffix(".weight")
            elif name.startswith("fc_norm."):
                target = name.replace("fc_norm.", "fc_norms.")
            if target not in params:
                raise ValueError(f"speculative_draft_model_path: unexpected weight {name!r}")
            dst = params[target].data
            dst = dst if rows is None else dst.narrow(0, *rows)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"speculative_draft_model_path: weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}:{rows}")
        expected = {f"{n}:{r}" for n in params for r in self._row_parts(n, fused)}
        if self.d2t is not None:
            expected.add("d2t")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"speculative_draft_model_path: the head is missing weights, e.g. {missing[:4]}")

    @staticmethod
    def _row_parts(param: str, fused: dict[str, tuple[str, int | None, int | None]]) -> list[tuple[int, int] | None]:
        parts = [(s, n) for t, s, n in fused.values() if t == param and s is not None]
        return parts or [None]  # type: ignore[list-item]

    # ---------------------------------------------------------------- forward
    def project(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's concatenated aux hidden states [T, n_aux x target hidden] -> the head's hidden [T, h]."""
        if self.input_norm is not None:
            aux = _rms(aux, self.input_norm.weight, self.eps)
        if self.fc_norms is not None:
            parts = aux.chunk(len(self.fc_norms), dim=-1)
            aux = torch.cat([_rms(p, n.weight, self.eps) for p, n in zip(parts, self.fc_norms)], dim=-1)
        return linear(aux, self.fc)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    def forward(self, batch: ForwardBatch, attn: PagedAttentionBackend, ops: KernelOps, cos_sin: torch.Tensor,
                embeds: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft-vocabulary logits of `batch.logits_indices` in float32, each token's output hidden [T, h])."""
        normed_hidden = ops.rms_norm(hidden, self.hidden_norm.weight, self.eps)
        residual = normed_hidden if self.cfg.norm_before_residual else hidden
        x = torch.cat([ops.rms_norm(embeds, self.input_layernorm.weight, self.eps), normed_hidden], dim=-1)
        qkv = linear(x, self.qkv_proj, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = ops.rms_norm(q, self.q_norm.weight, self.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.eps)
        q, k = ops.rotary(q, k, batch.positions, cos_sin)
        out = attn.forward(q, k, v, 0, batch).reshape(-1, self.q_size)
        mid = residual + linear(out, self.o_proj)
        mlp_in = ops.rms_norm(mid, self.post_attention_layernorm.weight, self.eps)
        after = mid + linear(ops.silu_and_mul(linear(mlp_in, self.gate_up_proj)), self.down_proj)
        normed = ops.rms_norm(after, self.norm.weight, self.eps)
        logits = linear(normed[batch.logits_indices], self.lm_head).float()
        return logits, (normed if self.cfg.norm_output else after)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32 (any width: the aux norms span n_aux x hidden, wider than the kernels take)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
