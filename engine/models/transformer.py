"""Our decoder-only transformer, one implementation for every supported family.

Parameter names equal Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so
checkpoints load without renaming. Every accelerated op goes through :mod:`kernels`.

Shapes: ``b`` batch, ``s`` sequence, ``d`` hidden size, ``h``/``kv`` query/key-value heads,
``hd`` head dim, ``V`` vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import ConfigurationError, SequenceTooLongError
from engine.models.config import ModelArgs
from engine.modules.checkpointing import current_policy, training_policy
from engine.modules.linear import Linear, glu_mlp, project, tiled_glu_mlp
from engine.modules.moe import SparseMoeBlock, load_balancing_loss
from engine_kernels.attention import attention
from engine_kernels.cross_entropy import fused_linear_cross_entropy
from engine_kernels.glu import glu_activation
from engine_kernels.rms_norm import rms_norm
from engine_kernels.rope import rope, rope_cos_sin
from engine_kernels.attention import PackedLayout, packed_layout
from engine_kernels.dispatch import attention_backend
from engine_kernels.lora_fused import DequantWorkspace
from engine_kernels.tiled_mlp import auto_tile_rows


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, scaling by ``offset + weight`` (the weight initialised to ``1 - offset``).

    ``offset`` 0 is Llama's norm (``w * cast(xhat)``); 1 is Gemma's (``(1 + w) * xhat`` in fp32, then cast).
    """

    def __init__(self, dim: int, eps: float, device=None, dtype=None, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset, device=device, dtype=dtype))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return rms_norm(x, self.weight, self.eps, offset=self.offset)
        return rms_norm(x, self.weight, self.eps)


@dataclass
class AttentionContext:
    """Per-forward data every layer's attention needs (computed once per forward).

    Attributes:
        cos, sin: RoPE tables ``[b, s, 1, hd]``.
        local_cos, local_sin: the sliding-window layers' tables where their RoPE differs (Gemma 3), else ``None``.
        key_padding_mask: bool ``[b, s_kv]`` or ``None``.
        doc_ids: int ``[b, s_kv]`` document index of packed sequences, or ``None``.
        doc_lengths: for one padding-free row (``b == 1``), the lengths of its packed documents.
        layout: for that row on the PyTorch attention path off CPU, how its documents are batched
            (:func:`engine_kernels.attention.packed_layout`), built once here and shared by every layer.
        cache: a :class:`~engine.models.generation.KVCache` during generation, else ``None``.
        workspace: the model's buffer that NF4 base weights are dequantized into (one at a time).
        router_logits: when the forward returns router logits (``output_router_logits``), the list every sparse
            layer appends its ``[b * s, E]`` router logits to; else ``None``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    local_cos: torch.Tensor | None = None
    local_sin: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    doc_lengths: tuple[int, ...] | None = None
    layout: PackedLayout | None = None
    cache: object | None = None
    workspace: DequantWorkspace | None = None
    router_logits: list | None = None


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (and per-head q/k norm, score soft-capping, local RoPE where the
    family has them)."""

    def __init__(self, args: ModelArgs, layer_idx: int, device=None, dtype=None):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, hd
        self.scale = args.attention_scale if args.attention_scale is not None else hd**-0.5
        self.softcap = args.attn_softcap
        self.sliding_window = args.sliding_windows[layer_idx] if args.sliding_windows else None
        # Sliding-window layers use the local RoPE tables where the family has them (Gemma 3).
        self.local_rope = self.sliding_window is not None and args.local_inv_freq is not None
        self.rotary_dim = args.rotary_dim
        self.fused_qkv = args.fused_qkv
        if self.fused_qkv:  # Phi-3: one projection, rows q | k | v
            self.qkv_proj = Linear(d, (args.num_heads + 2 * args.num_kv_heads) * hd, args.qkv_bias, device, dtype)
        else:
            self.q_proj = Linear(d, args.num_heads * hd, args.qkv_bias, device, dtype)
            self.k_proj = Linear(d, args.num_kv_heads * hd, args.qkv_bias, device, dtype)
            self.v_proj = Linear(d, args.num_kv_heads * hd, args.qkv_bias, device, dtype)
        self.o_proj = Linear(args.num_heads * hd, d, args.o_bias, device, dtype)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps, device, dtype, args.norm_offset)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps, device, dtype, args.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Args: x (Tensor): ``[b, s, d]``. Returns: Tensor ``[b, s, d]``."""
        b, s, _ = x.shape
        hd = self.head_dim
        if self.fused_qkv:
            qkv = project(x, (self.qkv_proj,), ctx.workspace, self.training)[0]
            q, k, v = qkv.split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        else:
            q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), ctx.workspace, self.training)
        q = q.reshape(b, s, self.num_heads, hd)
        k = k.reshape(b, s, self.num_kv_heads, hd)
        v = v.reshape(b, s, self.num_kv_heads, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (ctx.local_cos, ctx.local_sin) if self.local_rope else (ctx.cos, ctx.sin)
        if self.rotary_dim < hd:  # partial rotary (Phi-4-mini): the trailing dimensions pass through
            rd = self.rotary_dim
            q_rot, k_rot = rope(q[..., :rd].contiguous(), k[..., :rd].contiguous(), cos, sin)
            q, k = torch.cat([q_rot, q[..., rd:]], -1), torch.cat([k_rot, k[..., rd:]], -1)
        else:
            q, k = rope(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q_offset = 0
        if ctx.cache is not None:
            k, v, q_offset = ctx.cache.update(self.layer_idx, k, v)
        out = attention(
            q,
            k,
            v,
            scale=self.scale,
            q_offset=q_offset,
            key_padding_mask=ctx.key_padding_mask,
            doc_ids=ctx.doc_ids,
            sliding_window=self.sliding_window,
            doc_lengths=ctx.doc_lengths,
            layout=ctx.layout,
            softcap=self.softcap,
        )
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return project(out, (self.o_proj,), ctx.workspace, self.training)[0]


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, ``act`` silu (SwiGLU) or tanh-GELU (GeGLU, Gemma).

    Attributes:
        tile_rows (int or None): when set (``FastModel.set_tiled_mlp``), a training forward over more tokens
            than this runs in tiles of ``tile_rows`` rows (:mod:`engine_kernels.tiled_mlp`): only the input is saved for
            backward. ``"auto"``: tiles of :func:`engine_kernels.tiled_mlp.auto_tile_rows` rows for each input.
            ``None``: untiled.
    """

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.fused_gate_up = args.fused_gate_up
        if self.fused_gate_up:  # Phi-3: one projection, rows gate | up
            self.gate_up_proj = Linear(d, 2 * f, args.mlp_bias, device, dtype)
        else:
            self.gate_proj = Linear(d, f, args.mlp_bias, device, dtype)
            self.up_proj = Linear(d, f, args.mlp_bias, device, dtype)
        self.down_proj = Linear(f, d, args.mlp_bias, device, dtype)
        self.activation = args.activation
        self.tile_rows: int | str | None = None

    def forward(self, x: torch.Tensor, workspace: DequantWorkspace | None = None) -> torch.Tensor:
        """Args: x (Tensor): ``[..., d]``. Returns: Tensor ``[..., d]``."""
        if self.fused_gate_up:
            # The fused MLP Functions need separate gate/up projections: project, then the GLU op, then down
            # (autograd keeps gate/up and h; tiling does not apply).
            gate, up = project(x, (self.gate_up_proj,), workspace, self.training)[0].chunk(2, dim=-1)
            h = glu_activation(self.activation)(gate, up)
            return project(h, (self.down_proj,), workspace, self.training)[0]
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        tokens = x.numel() // x.shape[-1]
        rows = auto_tile_rows(tokens) if self.tile_rows == "auto" else self.tile_rows
        if self.training and rows and tokens > rows:
            return tiled_glu_mlp(x, *projections, workspace, self.training, self.activation, rows)
        return glu_mlp(x, *projections, workspace, self.training, self.activation)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    With ``args.sandwich_norms`` (Gemma 2/3) the outputs are normalised too: ``x + post_attention_layernorm(
    attn(input_layernorm(x)))`` then ``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``.
    """

    def __init__(self, args: ModelArgs, layer_idx: int, device=None, dtype=None):
        super().__init__()
        d, eps, offset = args.hidden_size, args.rms_norm_eps, args.norm_offset
        self.input_layernorm = RMSNorm(d, eps, device, dtype, offset)
        self.self_attn = Attention(args, layer_idx, device, dtype)
        self.post_attention_layernorm = RMSNorm(d, eps, device, dtype, offset)
        self.sparse = bool(args.sparse_layers and args.sparse_layers[layer_idx])
        if self.sparse:  # mixture of experts (Mixtral, Qwen3-MoE)
            self.mlp = SparseMoeBlock(
                d, args.num_experts, args.experts_per_token, args.expert_intermediate_size, args.norm_topk_prob,
                args.activation, device, dtype,
            )
        else:
            self.mlp = MLP(args, device, dtype)
        self.sandwich = args.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, device, dtype, offset)
            self.post_feedforward_layernorm = RMSNorm(d, eps, device, dtype, offset)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ctx.workspace))
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        if self.sparse:
            return x + self.mlp(self.post_attention_layernorm(x), ctx.workspace, ctx.router_logits)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.workspace)


class ScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by ``scale`` cast to the weights' dtype (Gemma: ``sqrt(hidden)``), as
    transformers' scaled embeddings do, so ``get_input_embeddings()(ids)`` gives what the layers see."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale: float, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        return x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)


class DecoderModel(nn.Module):
    """Embedding, the stack of decoder layers and the final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        if args.embed_scale is not None:
            self.embed_tokens = ScaledEmbedding(args.vocab_size, args.hidden_size, args.embed_scale, device, dtype)
        else:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, i, device, dtype) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, device, dtype, args.norm_offset)


@dataclass
class CausalLMOutput:
    """What a forward returns, attribute-compatible with Hugging Face's ``CausalLMOutputWithPast``.

    Attributes:
        loss: scalar mean cross-entropy over predicted tokens, when labels were given.
        logits: ``[b, s, V]`` (or the last ``logits_to_keep`` positions), ``None`` when a
            training loss was computed without ``return_logits`` (the fused loss never builds them).
        aux_loss: with ``output_router_logits`` (mixture of experts), the load-balancing loss (fp32 scalar); the
            ``loss`` then includes ``router_aux_loss_coef * aux_loss``, as transformers' does.
        router_logits: with ``output_router_logits``, each sparse layer's ``[b * s, E]`` router logits.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):  # tuple-style access, as transformers' ModelOutput allows
            return tuple(v for v in (self.loss, self.logits) if v is not None)[key]
        return getattr(self, key)


def packed_document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of each token for padding-free packed rows, or ``None`` if no row is packed.

    A row is packed when its position ids restart at 0 after the first token (TRL's and
    Hugging Face's padding-free convention). Returns int ``[b, s]``.
    """
    if position_ids.shape[1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    return (position_ids == 0).cumsum(dim=1)


def _lengths_from_cu_seq_lens(cu_seq_lens: torch.Tensor, s: int) -> tuple[int, ...]:
    """Document lengths from boundaries ``[0, ..., s]`` (one host copy of ``n_docs + 1`` integers)."""
    bounds = [int(v) for v in cu_seq_lens.reshape(-1).tolist()]
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if not bounds or bounds[0] != 0 or bounds[-1] != s or any(n <= 0 for n in lengths):
        raise ConfigurationError(
            f"cu_seq_lens {bounds[:8]}{'...' if len(bounds) > 8 else ''} are not increasing document boundaries "
            f"from 0 to the row's {s} tokens; pass the collator's cu_seq_lens unchanged, or leave them out"
        )
    return lengths


def drop_targets_after_leading_padding(labels: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Labels with -100 wherever the predicting position has seen no real token (left padding).

    Label ``t`` is predicted at position ``t - 1``. In a left-padded row the last pad position predicts the
    first real token while attending to no real key, so its output is undefined (transformers' value depends
    on the attention implementation); the engine drops that target instead (docs/parity.md). Right padding
    and rows without padding are unchanged.

    Args:
        labels (Tensor): int64 ``[b, s]`` (not shifted).
        key_padding_mask (Tensor): bool ``[b, s]``, true for real tokens.

    Returns:
        int64 ``[b, s]``.
    """
    seen = key_padding_mask.to(labels.device).long().cumsum(-1) > 0
    unseen_before = torch.nn.functional.pad(~seen[:, :-1], (1, 0), value=False)
    return labels.masked_fill(unseen_before, -100)


def _longest_position(position_ids: torch.Tensor) -> int:
    """Largest position id + 1 (one host sync); on ``meta`` tensors (memory planning), the row length."""
    if position_ids.device.type == "meta":
        return position_ids.shape[-1]
    return int(position_ids.max()) + 1


class CausalLM(nn.Module):
    """Decoder-only language model with a (possibly tied) output head.

    Args:
        args (ModelArgs): the architecture.
        max_seq_length (int): longest sequence the forward accepts.
        device, dtype: where and in which dtype parameters are created.
    """

    #: For transformers.Trainer: forward takes ``num_items_in_batch`` and its loss shifts labels
    #: (so the Trainer counts ``labels[..., 1:]`` when normalising over gradient accumulation).
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"
    main_input_name = "input_ids"
    #: For FSDP2 (accelerate's ``fsdp_version=2``, :func:`engine.distributed.fully_shard_model`): each decoder layer
    #: is one sharding unit (its weights are gathered together); ``model`` holds the embedding, layers and final norm.
    _no_split_modules = ["DecoderLayer"]
    base_model_prefix = "model"

    def __init__(self, args: ModelArgs, max_seq_length: int = 2048, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.max_seq_length = max_seq_length
        self._workspace = DequantWorkspace()  # NF4 base weights are dequantized into it, one at a time
        self.model = DecoderModel(args, device, dtype)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, False, device, dtype)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", args.inv_freq.clone().to(device), persistent=False)
        local, long = args.local_inv_freq, args.long_inv_freq
        self.register_buffer("local_inv_freq", None if local is None else local.clone().to(device), persistent=False)
        self.register_buffer("long_inv_freq", None if long is None else long.clone().to(device), persistent=False)
        self.gradient_checkpointing: bool | str = False
        self.tiled_mlp: int | str | None = None  # rows per MLP tile in training (FastModel.set_tiled_mlp), None: off
        # Attached by the loader: the transformers config and the source the weights came from.
        self.hf_config = None
        self.name_or_path: str | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def config(self):
        """The transformers config this model was built from (what ``save_pretrained`` writes)."""
        return self.hf_config

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Turn checkpointing on, as transformers' Trainer does for ``gradient_checkpointing=True`` (alias
        ``activation_checkpointing``): every layer (keeps ``"smart"`` if it is already on; replaces ``"auto"``),
        layers ``0, n, 2n, ...`` for ``every_n_layers=n`` (``"every_<n>"``), every layer with its input in host
        memory for ``offload=True`` (``"smart"``). Other keyword arguments of ``torch.utils.checkpoint`` are
        ignored (the engine always checkpoints non-reentrantly)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ConfigurationError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        if every_n_layers > 1:
            if offload:
                raise ConfigurationError(
                    "offload=True applies to every layer (the engine's 'smart' checkpointing); use every_n_layers=1"
                )
            self.gradient_checkpointing = f"every_{every_n_layers}"
            return
        policy = current_policy(self)
        if offload:
            self.gradient_checkpointing = "smart"
        elif policy is None or policy.mode != "smart":
            self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' newer name of :meth:`gradient_checkpointing_enable`."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any decoder layer is recomputed in backward (``False`` while ``"auto"`` is not resolved)."""
        policy = current_policy(self)
        return policy is not None and policy.mode != "none"

    @property
    def checkpoint_policy(self):
        """The :class:`~engine.modules.checkpointing.CheckpointPolicy` training forwards use (``None`` while
        ``gradient_checkpointing="auto"`` waits for its first training step)."""
        return current_policy(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> Linear:
        """The output head (``lm_head``); its weight is the embedding's when ``tie_word_embeddings``."""
        return self.lm_head

    def tie_weights(self) -> None:
        """Make ``lm_head`` use the embedding weight again when the family ties them (a no-op otherwise).

        Code that replaces parameters (accelerate's FSDP2 loading moves the model to ``meta`` and back) calls this.
        """
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_memory_footprint(self) -> int:
        """Bytes held by parameters and buffers (shared tensors counted once)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t is None or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def _context(self, input_ids, attention_mask, position_ids, cache, dtype, cu_seq_lens=None) -> AttentionContext:
        b, s = input_ids.shape[:2]
        past = cache.length if cache is not None else 0
        key_padding_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if attention_mask.shape != (b, past + s):
                raise ConfigurationError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + s)} "
                    "(batch, cached + new tokens)"
                )
            if not bool(attention_mask.all()):
                key_padding_mask = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
        doc_ids = doc_lengths = layout = None
        if attention_mask is None and cache is None:
            if cu_seq_lens is not None and b == 1:
                doc_lengths = _lengths_from_cu_seq_lens(cu_seq_lens, s)
            else:
                doc_ids = packed_document_ids(position_ids)
        if doc_ids is not None and b == 1:
            # One padding-free row: variable-length attention over its documents (no [s, s] mask).
            doc_lengths = tuple(torch.bincount(doc_ids[0] - doc_ids[0, 0]).tolist())
            doc_ids = None
        if doc_lengths is not None and len(doc_lengths) < 2:
            doc_lengths = None  # one document: plain causal attention
        off_cpu_torch = input_ids.device.type != "cpu" and attention_backend(input_ids.device, dtype) == "torch"
        if doc_lengths is not None and off_cpu_torch:
            layout = packed_layout(doc_lengths, input_ids.device)
        inv_freq = self.inv_freq
        if self.long_inv_freq is not None and _longest_position(position_ids) > self.args.long_rope_threshold:
            inv_freq = self.long_inv_freq  # LongRoPE: per forward, from the positions (as transformers decides)
        cos, sin = rope_cos_sin(position_ids, inv_freq, self.args.rope_attention_scaling, dtype)
        local_cos = local_sin = None
        if self.local_inv_freq is not None:
            local_cos, local_sin = rope_cos_sin(
                position_ids, self.local_inv_freq, self.args.local_rope_attention_scaling, dtype
            )
        return AttentionContext(
            cos, sin, local_cos, local_sin, key_padding_mask, doc_ids, doc_lengths, layout, cache, self._workspace
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool | None = None,
        logits_to_keep: int = 0,
        cache=None,
        cu_seq_lens: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **unused,
    ) -> CausalLMOutput:
        """Run the model.

        Args:
            input_ids (Tensor): int64 ``[b, s]`` (or give ``inputs_embeds [b, s, d]``).
            attention_mask (Tensor, optional): ``[b, s]`` 1 for real tokens, 0 for padding
                (``[b, cached + s]`` during generation).
            position_ids (Tensor, optional): ``[b, s]``. Rows whose ids restart at 0 mid-row are
                treated as packed documents that never attend to each other (when no
                ``attention_mask`` is given).
            labels (Tensor, optional): int64 ``[b, s]``; shifted inside (token ``t`` predicts
                ``labels[t + 1]``); -100 is ignored. The loss is the mean over predicted tokens. With left
                padding the first real token is not a target (it would be predicted from a pad position
                that sees no real token; transformers keeps it, see docs/parity.md).
            num_items_in_batch: divide the summed loss by this instead (gradient accumulation).
            return_logits (bool, optional): also return logits when computing a loss. By default
                (``None``) logits are returned when no labels are given or the model is in eval mode
                (so ``transformers.Trainer.evaluate`` with ``compute_metrics`` gets them); in training
                with labels they are not computed (the loss is fused and chunked, never ``[N, V]``).
                ``False`` never returns them.
            logits_to_keep (int): if > 0, compute logits for the last ``logits_to_keep`` positions only.
            cache: a KV cache (used by :meth:`generate`).
            cu_seq_lens (Tensor, optional): int ``[n_docs + 1]`` document boundaries (0, ..., s) of one
                padding-free row (``b == 1``, no ``attention_mask``), as :class:`~engine.training.PaddingFreeCollator`
                returns them; the boundaries are then taken from it instead of being derived from the
                restarting ``position_ids``. Both must describe the same documents.
            output_router_logits (bool, optional): mixture-of-experts models: also return every sparse layer's
                router logits and the load-balancing ``aux_loss`` (over real tokens), and add
                ``router_aux_loss_coef * aux_loss`` to the loss. Default: the config's ``output_router_logits``
                (off unless the config turns it on, as in transformers).

        Returns:
            CausalLMOutput with ``loss`` and ``logits``.

        Raises:
            SequenceTooLongError: if ``s`` (plus cached tokens) exceeds ``max_seq_length``.
        """
        if unused:
            unknown = sorted(k for k in unused if k not in ("use_cache", "return_dict", "output_attentions", "output_hidden_states"))
            if unknown:
                raise ConfigurationError(f"forward() got unexpected arguments {unknown}")
        if output_router_logits is None:
            output_router_logits = self.args.output_router_logits
        router_logits = [] if output_router_logits and self.args.num_experts else None
        x, labels = self._hidden_states(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache,
                                        cu_seq_lens, router_logits)

        loss = logits = aux_loss = None
        if labels is not None:
            loss = self._loss(x, labels, num_items_in_batch)
        if router_logits:
            mask = None if attention_mask is None or cache is not None else attention_mask
            aux_loss = load_balancing_loss(router_logits, self.args.num_experts, self.args.experts_per_token, mask)
            if loss is not None:
                loss = loss + self.args.router_aux_loss_coef * aux_loss.to(loss.device)
        if return_logits is None:
            return_logits = labels is None or not self.training
        if return_logits:
            kept = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
            logits = self.lm_head(kept)
            if self.args.final_softcap is not None:
                cap = self.args.final_softcap
                logits = torch.tanh(logits / cap) * cap
        return CausalLMOutput(
            loss=loss, logits=logits, aux_loss=aux_loss, router_logits=tuple(router_logits) if router_logits else None
        )

    def _hidden_states(self, input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cu_seq_lens=None,
                       router_logits: list | None = None):
        """Final-norm hidden states ``[b, s, d]`` and the labels with packed-document starts (and targets after
        leading padding) masked."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigurationError("pass exactly one of input_ids or inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if cu_seq_lens is not None and position_ids is None and attention_mask is None and cache is None:
            lengths = torch.tensor(_lengths_from_cu_seq_lens(cu_seq_lens, x.shape[1]))
            starts = torch.cumsum(lengths, 0) - lengths
            position_ids = (torch.arange(x.shape[1]) - torch.repeat_interleave(starts, lengths)).to(x.device)[None]
        total = x.shape[1] + (cache.length if cache is not None else 0)
        if total > self.max_seq_length and position_ids is not None and cache is None and attention_mask is None:
            # A padding-free row may be longer than max_seq_length; its documents (restarting positions) may not.
            total = int(position_ids.max()) + 1
        if total > self.max_seq_length:
            raise SequenceTooLongError(
                f"sequence of {total} tokens is longer than max_seq_length={self.max_seq_length}. "
                f"Truncate or split the input, or load the model with a larger max_seq_length "
                f"(the model was trained with {self.args.max_position_embeddings} positions)."
            )
        ctx = self._context(
            input_ids if input_ids is not None else x[..., 0], attention_mask, position_ids, cache, x.dtype, cu_seq_lens
        )
        if (ctx.doc_ids is not None or ctx.doc_lengths is not None) and labels is not None:
            # The first token of each packed document must not be predicted from the previous document.
            labels = labels.masked_fill(position_ids == 0, -100)
        if ctx.key_padding_mask is not None and labels is not None and cache is None:
            labels = drop_targets_after_leading_padding(labels, ctx.key_padding_mask)
        ctx.router_logits = router_logits
        policy = training_policy(self, x)  # None: no layer recomputed (eval, no_grad, off); resolves "auto" once
        for i, layer in enumerate(self.model.layers):
            x = layer(x, ctx) if policy is None else policy.run_layer(i, layer, x, ctx)
        return self.model.norm(x), labels

    def token_log_probs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-probability the model gives each label token, without materialising all logits.

        Args:
            input_ids (Tensor): int64 ``[b, s]``.
            labels (Tensor): int64 ``[b, s]``, -100 where no log-prob is wanted. Aligned with
                ``input_ids`` (not shifted): ``out[:, t]`` is ``log p(labels[:, t] | tokens < t)``.
            attention_mask, position_ids: as in :meth:`forward` (restarting position ids mean
                packed documents; the first token of each document, and of a left-padded row, gets no
                log-prob).

        Returns:
            float32 ``[b, s]``: the log-probabilities, 0 at ``t = 0`` and wherever the label is -100.
        """
        from engine_kernels.token_log_probs import linear_token_log_probs

        x, labels = self._hidden_states(input_ids, attention_mask, position_ids, labels, None, None)
        if self.lm_head.has_lora or self.lm_head.is_quantized:
            raise ConfigurationError("LoRA or 4-bit quantization on lm_head is not supported")
        b, s, d = x.shape
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).to(x.device)
        softcap = {} if self.args.final_softcap is None else {"softcap": self.args.final_softcap}
        logps = linear_token_log_probs(x.reshape(-1, d), self.lm_head.weight, shifted.reshape(-1), **softcap).view(b, s)
        # logps[:, t] scores labels[:, t + 1]; move it to position t + 1.
        return torch.nn.functional.pad(logps[:, :-1], (1, 0), value=0.0)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).to(hidden.device)
        if num_items_in_batch is None and not bool((shifted != -100).any()):
            raise ConfigurationError(
                "every label in this batch is -100 (ignored), so there is nothing to learn from. "
                "Check the label masking (e.g. train_on_responses_only markers) and that sequences are not truncated "
                "before the response."
            )
        if self.lm_head.has_lora or self.lm_head.is_quantized:
            raise ConfigurationError("LoRA or 4-bit quantization on lm_head is not supported")
        d = hidden.shape[-1]
        return fused_linear_cross_entropy(
            hidden.reshape(-1, d), self.lm_head.weight, shifted.reshape(-1), num_items_in_batch=num_items_in_batch,
            softcap=self.args.final_softcap,
        )

    # ------------------------------------------------------------------ generation and saving
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Autoregressive generation with a KV cache; see :func:`engine.models.generation.generate`."""
        from engine.models.generation import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write the LoRA adapter in PEFT format (or, without LoRA, the whole model); see :mod:`engine.saving`."""
        from engine.saving import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit", **kwargs) -> None:
        """Merge LoRA into the base weights and write a Hugging Face model folder; see :mod:`engine.saving`."""
        from engine.saving import save_pretrained_merged

        save_pretrained_merged(self, save_directory, tokenizer, save_method=save_method, **kwargs)

    def save_pretrained_gguf(self, save_directory, tokenizer=None, quantization_method="q8_0", **kwargs):
        """Merge LoRA and write llama.cpp GGUF file(s); see :func:`engine.gguf.writer.save_pretrained_gguf`."""
        from engine.gguf.writer import save_pretrained_gguf

        return save_pretrained_gguf(self, save_directory, tokenizer, quantization_method, **kwargs)
