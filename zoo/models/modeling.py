"""The one model family: ``ZooModel``, ``ZooForCausalLM``, ``ZooForSequenceClassification``.

No per-architecture copy of the modeling code: each layer is ``x + mixer(norm(x))`` then optionally
``x + mlp(norm(x))``, with the mixer picked from the registry by the config.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from zoo.mixers.base import RecurrentMixer
from zoo.models.cache import ZooCache
from zoo.models.configuration import ZooConfig
from zoo.models.loss import IGNORE_INDEX, causal_lm_loss, tiled_causal_lm_loss, tiled_linear_cross_entropy
from zoo.models.validation import check_inputs, check_labels
from zoo.nn import RMSNorm
from zoo.nn.mlp import build_mlp
from zoo.packing import packed_cu_seqlens
from zoo.parallel import sequence
from zoo.registry import build_mixer

_OUT_PROJ_SUFFIXES = ("out_proj.weight", "o_proj.weight", "mlp.w2.weight")

#: The name under which the installed transformers hands the cache from generate() to ``forward`` and back:
#: ``past_key_values`` in transformers 5.5, ``cache`` in 5.24. ``forward`` accepts both.
GENERATION_CACHE_KEY = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
#: The field of transformers' output classes that holds the cache (same rename).
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
# Arguments transformers may pass that carry nothing for these models (positions come from the cache).
_IGNORED_KWARGS = ("return_dict", "cache_position")


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "got both cache= and past_key_values= (two names of the same argument in different transformers "
            "versions); pass the cache once."
        )
    return cache if cache is not None else past_key_values


def _reject_unknown(kwargs: dict, where: str) -> None:
    # An argument that is silently dropped gives a silently wrong result (as a renamed cache did): refuse it.
    if kwargs.get("output_attentions"):
        raise ValueError(f"{where}: zoo models have no attention weights to return; call without output_attentions=True.")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS and k != "output_attentions")
    if unknown:
        raise TypeError(f"{where} got unexpected argument(s) {unknown}; remove them (see the signature for what it reads).")


class ZooBlock(nn.Module):
    """Pre-norm residual block: ``x = x + mixer(norm(x)); x = x + mlp(norm(x))`` (MLP optional)."""

    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        spec = config.layers[layer_idx]
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = build_mixer(spec["mixer"], config.d_model, layer_idx=layer_idx, kwargs=spec["kwargs"],
                                 backend=config.backend)
        kind = spec["mlp"]
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps) if kind != "none" else None
        self.mlp = (
            build_mlp(kind, config.d_model, hidden=config.mlp_hidden, moe=config.moe, chunk_size=config.mlp_chunk_size)
            if kind != "none" else None
        )

    def forward(self, x, *, cache=None, attention_mask=None, cu_seqlens=None):
        x = x + self.mixer(self.mixer_norm(x), cache=cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class ZooPreTrainedModel(PreTrainedModel):
    config_class = ZooConfig
    config: ZooConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZooBlock"]
    _supports_sdpa = True
    _can_compile_fullgraph = False
    # The models average their own loss (and add router aux losses); transformers' Trainer must not pass
    # num_items_in_batch and must scale for gradient accumulation itself.
    accepts_loss_kwargs = False

    # ----- the heads' shared parts (ZooModel, the backbone, overrides the embedding accessors) -----------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def _new_head(self, out_features: int) -> nn.Linear:
        """A bias-free output layer on the backbone's width, marked ``_zoo_head`` for ``_init_weights``."""
        head = nn.Linear(self.config.d_model, out_features, bias=False)
        head._zoo_head = True
        return head

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """A no-op: every saved config carries the ``auto_map`` and code file (``ZooConfig.save_pretrained``).

        (transformers calls this when it loads the model through ``trust_remote_code``; its default would copy
        this package's source files into the next checkpoint saved.)
        """

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, *, mixers: list[str] | None = None,
        offload: bool = False, every_n_layers: int = 1,
    ) -> None:
        """Recompute each block in backward instead of keeping its activations (``torch.utils.checkpoint``).

        ``mixers``: checkpoint only the blocks whose mixer is named here (e.g. ``["attention"]`` in a hybrid); None:
        every block. ``offload``: also keep the saved block inputs in CPU memory on CUDA (see
        ``ZooModel.activation_offload``). ``gradient_checkpointing_kwargs`` go to ``checkpoint`` (default
        ``use_reentrant=False``). ``every_n_layers``: checkpoint every n-th of the chosen blocks (transformers' option).
        """
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be at least 1 (got {every_n_layers}).")
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        names = set(self.config.mixer_names)
        if mixers is not None:
            mixers = [mixers] if isinstance(mixers, str) else list(mixers)
            unknown = sorted(set(mixers) - names)
            if unknown:
                raise ValueError(
                    f"gradient checkpointing: the model has no mixer {unknown}; choose from {sorted(names)}."
                )
        for module in self.modules():
            if isinstance(module, ZooModel):
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)
                module.checkpoint_mixers = None if mixers is None else frozenset(mixers)
                module.checkpoint_every = int(every_n_layers)
                module.activation_offload = bool(offload) or module.activation_offload
        if kwargs["use_reentrant"]:
            self.enable_input_require_grads()  # reentrant checkpoint needs an input that requires grad

    def gradient_checkpointing_disable(self) -> None:
        """Undo :meth:`gradient_checkpointing_enable` (and its offload)."""
        for module in self.modules():
            if isinstance(module, ZooModel):
                module.gradient_checkpointing = False
                module.checkpoint_mixers = None
                module.checkpoint_every = 1
                module.activation_offload = False
        if getattr(self, "_require_grads_hook", None) is not None:
            self.disable_input_require_grads()

    # ----- parameters kept in float32 ---------------------------------------------------------------
    # A mixer lists the parameters that must never be stored below float32 (SSM parameters such as S4's log_dt,
    # A, B, C, decay rates) in its class attribute ``keep_in_fp32``; this is the one reader of that declaration.
    # It holds for ``model.to(torch.bfloat16)`` / ``.half()`` (``_apply``), for ``from_pretrained(...,
    # dtype=torch.bfloat16)`` (transformers' ``_keep_in_fp32_modules_strict``, set in ``post_init``) and for a
    # model built under a bf16 default dtype (``post_init`` casts them back). Training under bf16 autocast keeps
    # every weight in float32 anyway.
    def fp32_parameters(self) -> dict[str, nn.Parameter]:
        """Full name -> parameter for every parameter a mixer declares in ``keep_in_fp32`` (names relative to it)."""
        out = {}
        for prefix, module in self.named_modules():
            for name in getattr(type(module), "keep_in_fp32", ()):
                owner, _, leaf = name.rpartition(".")
                param = (module.get_submodule(owner) if owner else module)._parameters.get(leaf)
                if param is not None:  # (an optional parameter may be None)
                    out[f"{prefix}.{name}" if prefix else name] = param
        return out

    def post_init(self) -> None:
        super().post_init()
        keep = self.fp32_parameters()
        with torch.no_grad():
            for param in keep.values():
                if param.is_floating_point() and torch.finfo(param.dtype).bits < 32:
                    param.data = param.data.float()
        # Anchored at a name boundary, so that layers.1.mixer.B does not also match layers.11.mixer.B.
        self._keep_in_fp32_modules_strict |= {rf"(?:^|\.){re.escape(name)}$" for name in keep}

    def _apply(self, fn, recurse: bool = True):
        keep = {id(t) for p in self.fp32_parameters().values() for t in (p, p.grad) if t is not None}
        if not keep:
            return super()._apply(fn, recurse)

        def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                out = t.to(device=out.device, dtype=torch.float32)  # the move without the downcast
            return out

        return super()._apply(at_least_fp32, recurse)

    def _init_weights(self, module: nn.Module) -> None:
        # Mixers initialise themselves (each paper's scheme); only the model's own layers are set here.
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.Linear) and getattr(module, "_zoo_head", False):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@dataclass
class ZooModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the packing the forward used (``cu_seqlens`` over the flattened tokens)."""

    cu_seqlens: torch.Tensor | None = None


class ZooModel(ZooPreTrainedModel):
    """Embedding, the stack of blocks, final RMSNorm."""

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(ZooBlock(config, i) for i in range(config.n_layers))
        self.shared = nn.ModuleDict()
        self._bind_shared()
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_mixers: frozenset[str] | None = None  # None: checkpoint every block
        self.checkpoint_every = 1  # of the blocks chosen, checkpoint every n-th
        # CPU offload of the tensors saved for backward by the blocks (with checkpointing: only the block inputs);
        # only on CUDA, where device memory is what runs out. On CPU it changes nothing.
        self.activation_offload = False
        self.post_init()
        if config.rescale_prenorm_residual:
            self._rescale_out_projections()

    def _bind_shared(self) -> None:
        by_name: dict[str, list[int]] = {}
        for i, spec in enumerate(self.config.layers):
            by_name.setdefault(spec["mixer"], []).append(i)
        for name, idx in by_name.items():
            cls = type(self.layers[idx[0]].mixer)
            module = cls.build_shared(
                d_model=self.config.d_model,
                layer_indices=idx,
                n_layers=self.config.n_layers,
                kwargs=[self.config.layers[i]["kwargs"] for i in idx],
            )
            if module is not None:
                self.shared[name] = module
                for i in idx:
                    self.layers[i].mixer.bind_shared(module)

    @torch.no_grad()
    def _rescale_out_projections(self) -> None:
        # GPT-2 / Mamba scheme: residual-branch output projections scaled by 1/sqrt(2 * n_layers).
        scale = 1.0 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.layers.named_parameters():
            if name.endswith(_OUT_PROJ_SUFFIXES) and p.device.type != "meta":
                p.mul_(scale)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def new_cache(self) -> ZooCache:
        """An empty hybrid cache: one transformers cache layer per block, chosen by its mixer."""
        return ZooCache([block.mixer.cache_layer() for block in self.layers])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ZooCache | None = None,
        past_key_values: ZooCache | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ZooModelOutput:
        """Run the stack. The cache may come as ``cache`` or ``past_key_values`` (transformers' two names).

        Packed documents may be described by ``cu_seqlens``, by HF's ``cu_seq_lens_q/k`` (+ ``max_length_q/k``),
        by ``seq_idx`` or by ``position_ids`` that restart (``DataCollatorWithFlattening``); all given must agree.
        Consecutive ``position_ids`` (as from ``generate()``) are ordinary positions. The resolved packing, over the
        flattened ``(1, B * L)`` tokens, is returned as ``cu_seqlens``.
        """
        _reject_unknown(kwargs, type(self).__name__ + ".forward")
        cache = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        check_inputs(input_ids, inputs_embeds, self.config.vocab_size)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, D = x.shape
        if L == 0:
            raise ValueError(
                "the input has no tokens; when generate() continues from a cache, pass the whole sequence so far "
                "(prompt + generated tokens) as input_ids."
            )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        shard = sequence.active()
        if shard is not None:
            cu_seqlens = _sequence_parallel_packing(
                shard, B, L, cache=cache, use_cache=use_cache, attention_mask=attention_mask,
                given=(cu_seqlens, position_ids, cu_seq_lens_q, cu_seq_lens_k, seq_idx),
            )
            cache, use_cache = None, False
        else:
            cu_seqlens = packed_cu_seqlens(
                B, L, cu_seqlens=cu_seqlens, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens_q,
                cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q, max_length_k=max_length_k, seq_idx=seq_idx,
                attention_mask=attention_mask,
            )
        if cu_seqlens is not None and (cache is not None or (use_cache and not self.training)):
            raise ValueError(
                "packed documents (cu_seqlens, or position_ids/seq_idx that restart) cannot be decoded with a cache; "
                "call the model with use_cache=False and no cache, or generate from each document alone."
            )
        if use_cache and cache is None and not self.training:
            cache = self.new_cache()
        if cu_seqlens is not None and B > 1:
            x = x.reshape(1, B * L, D)  # several packed rows: one row whose documents include every row start
        hidden = [] if output_hidden_states else None
        grad = self.training and torch.is_grad_enabled()
        chosen = 0
        with offload_context(grad and self.activation_offload, x.device):
            for spec, block in zip(self.config.layers, self.layers):
                if hidden is not None:
                    hidden.append(x)
                recompute = False
                if grad and self.gradient_checkpointing and (
                    self.checkpoint_mixers is None or spec["mixer"] in self.checkpoint_mixers
                ):
                    recompute, chosen = chosen % self.checkpoint_every == 0, chosen + 1
                if recompute and self._tiles(block, x.shape[1], attention_mask, cu_seqlens):
                    x = self._checkpointed_tiles(block, x)
                elif recompute:
                    x = self._gradient_checkpointing_func(_run_block, block, x, attention_mask, cu_seqlens)
                else:
                    x = block(x, cache=cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        x = self.norm_f(x)
        if hidden is not None:
            hidden.append(x)
        return ZooModelOutput(
            last_hidden_state=x.reshape(B, L, D),
            hidden_states=tuple(h.reshape(B, L, D) for h in hidden) if hidden is not None else None,
            cu_seqlens=cu_seqlens,
            **{_OUTPUT_CACHE_FIELD: cache if use_cache or cache is not None else None},
        )

    def _tiles(self, block: ZooBlock, L: int, attention_mask, cu_seqlens) -> bool:
        """Whether a checkpointed block runs in sequence tiles (``config.checkpoint_chunk_size``)."""
        chunk = self.config.checkpoint_chunk_size
        mixer = block.mixer
        return (
            0 < chunk < L and isinstance(mixer, RecurrentMixer) and mixer.causal and mixer.sequence_tiles
            and attention_mask is None and cu_seqlens is None and sequence.active() is None
        )

    def _checkpointed_tiles(self, block: ZooBlock, x: torch.Tensor) -> torch.Tensor:
        """``block(x)`` tile by tile: each tile checkpointed with the mixer state it starts from (saved: x, states)."""
        chunk, state, outs = self.config.checkpoint_chunk_size, None, []
        for s in range(0, x.shape[1], chunk):
            y, state = self._gradient_checkpointing_func(_run_block_tile, block, x[:, s : s + chunk], state)
            outs.append(y)
        return torch.cat(outs, dim=1)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (routers) left by the last forward, or None."""
        total = None
        for module in self.modules():
            a = getattr(module, "aux_loss", None)
            if isinstance(a, torch.Tensor):
                total = a if total is None else total + a
        return total


def _sequence_parallel_packing(shard, B: int, L: int, *, cache, use_cache, attention_mask, given) -> torch.Tensor | None:
    """Checks of a sequence-parallel forward; returns the slice's packing (``shard.local_cu_seqlens``)."""
    if cache is not None or use_cache:
        raise ValueError(
            "sequence parallelism runs training and scoring forwards only; decode with a cache in one process "
            "(load the checkpoint without train.parallel.sequence)."
        )
    if attention_mask is not None:
        raise ValueError(
            "sequence parallelism takes no padding mask; pack the documents into one row (the shard's cu_seqlens) "
            "instead of padding them."
        )
    if any(g is not None for g in given):
        raise ValueError(
            "under sequence parallelism the packing comes from the shard (SequenceShard(cu_seqlens=...)); do not pass "
            "cu_seqlens, position_ids or seq_idx to the model."
        )
    if L != shard.length:
        raise ValueError(f"this rank holds {shard.length} tokens of each sequence; got an input of {L} (pass shard.take(ids)).")
    if shard.cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequence-parallel input must be one row (batch 1); got batch {B}.")
    return shard.local_cu_seqlens


def _run_block(block: ZooBlock, x, attention_mask, cu_seqlens):
    return block(x, attention_mask=attention_mask, cu_seqlens=cu_seqlens)


def _run_block_tile(block: ZooBlock, x, state):
    """One sequence tile of a recurrent block, continuing from ``state``: ``(out, state after the tile)``."""
    h, new = block.mixer.scan(block.mixer_norm(x), state=state, return_state=True)
    x = x + h
    if block.mlp is not None:
        x = x + block.mlp(block.mlp_norm(x))
    return x, new


def offload_context(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """``save_on_cpu`` (pinned) when ``enabled`` on CUDA, else nothing: the tensors autograd saves wait in host memory."""
    if enabled and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


@dataclass
class ZooCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """Language model head on ``ZooModel``; ``generate()`` keeps states and KV in transformers' caches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = self._new_head(config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> ZooCache:
        return self.model.new_cache()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        # generate() would build a plain DynamicCache from the config; recurrent layers need their own layer type.
        # A cache the caller passed under the other transformers version's name is moved to the one this one reads.
        given = [name for name in ("cache", "past_key_values") if model_kwargs.get(name) is not None]
        if len(given) == 2:
            _one_cache(model_kwargs["cache"], model_kwargs["past_key_values"])
        if given and given[0] != GENERATION_CACHE_KEY:
            model_kwargs[GENERATION_CACHE_KEY] = model_kwargs.pop(given[0])
        if model_kwargs.get(GENERATION_CACHE_KEY) is None and generation_config.use_cache is not False:
            model_kwargs[GENERATION_CACHE_KEY] = self.new_cache()
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def compile_decode(self, enable: bool = True, *, freeze: bool = True) -> ZooForCausalLM:
        """Run each later decode step (one new token per sequence, a cache, no grad, eval mode: ``generate()`` or
        an own loop) as one ``torch.compile``d graph: every layer's step, the norms and the head, without Python
        between the ops. Returns the model. ``enable=False`` goes back to eager steps.

        ``freeze`` (default) lets inductor treat the weights as constants (``freezing``: prepacked GEMV weights,
        folded ``-exp(A_log)``); a weight changed in place (an optimizer step, ``load_state_dict``) is noticed
        before the next step (each parameter's version counter) and the step recompiles, after
        ``torch.compiler.reset()``. Writes through ``param.data`` bypass the version counter: call
        ``compile_decode()`` again after them. The first step (and one per new cache shape, e.g. a growing KV
        cache) compiles for some seconds; prefill and training stay eager.
        """
        self.__dict__["_decode_compiled"] = None  # kept out of nn.Module's registry (it wraps this module)
        self.__dict__["_decode_weights"] = None
        if enable:
            compiled = torch.compile(self)

            def step(**kw):
                import torch._inductor.config as inductor_config  # (read when a graph is (re)compiled)

                with inductor_config.patch(freezing=freeze):
                    return compiled(**kw)

            self.__dict__["_decode_compiled"] = step
        return self

    def _compiled_step(self, input_ids, cache, attention_mask, position_ids, labels, inputs_embeds, use_cache,
                       packing, output_hidden_states):
        """The compiled decode step (:meth:`compile_decode`) when this call is one, else None."""
        if torch.compiler.is_compiling():  # (inside the compiled step itself)
            return None
        compiled = self.__dict__.get("_decode_compiled")
        if (
            compiled is None or self.training or torch.is_grad_enabled()
            or labels is not None or inputs_embeds is not None or input_ids is None or cache is None
            or use_cache is False or output_hidden_states or any(v is not None for v in packing)
            or input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.device.type not in ("cpu", "cuda")
        ):
            return None
        if attention_mask is not None and not bool(attention_mask.all()):
            return None
        if position_ids is not None and not bool((position_ids > 0).all()):
            return None  # a position 0 starts a new document: the eager path says what that means
        check_inputs(input_ids, None, self.config.vocab_size)  # (skipped inside the compiled graph)
        weights = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        if weights != self.__dict__["_decode_weights"]:
            if self.__dict__["_decode_weights"] is not None:
                torch.compiler.reset()  # frozen weights are constants of the old graph
            self.__dict__["_decode_weights"] = weights
        return compiled

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: ZooCache | None = None,
        past_key_values: ZooCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        seq_idx: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ) -> ZooCausalLMOutput:
        """Logits (and, with ``labels``, the next-token loss). Arguments as in :meth:`ZooModel.forward`.

        With packed documents the loss never predicts a document's first token from the previous document.
        With ``labels`` in training mode the loss is computed in tiles of ``config.loss_chunk_size`` tokens (LM head
        and cross entropy per tile, recomputed in backward) and no logits are returned, unless ``return_logits=True``
        (or ``loss_chunk_size`` is 0). In eval mode, or without labels, the logits are always returned.
        """
        _reject_unknown(kwargs, type(self).__name__ + ".forward")
        step = self._compiled_step(
            input_ids, _one_cache(cache, past_key_values), attention_mask, position_ids, labels, inputs_embeds,
            use_cache, (cu_seqlens, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, seq_idx),
            output_hidden_states,
        )
        if step is not None:
            return step(input_ids=input_ids, cache=_one_cache(cache, past_key_values), use_cache=True,
                        logits_to_keep=logits_to_keep)
        check_labels(labels, self.config.vocab_size)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=_one_cache(cache, past_key_values),
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            seq_idx=seq_idx,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position; call with logits_to_keep=0.")
        tiled = (
            labels is not None and self.training and not return_logits and self.config.loss_chunk_size > 0
            and isinstance(self.lm_head, nn.Linear) and self.lm_head.bias is None
        )
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = None if tiled else self.lm_head(h)
        loss = aux = None
        if labels is not None:
            B, L = h.shape[:2]
            if out.cu_seqlens is not None and B > 1:  # packed rows were run as one row: so is the loss
                h, labels = h.reshape(1, B * L, -1), labels.reshape(1, B * L)
            shard = sequence.active()
            if shard is not None:
                loss = self._sequence_parallel_loss(h, logits, labels, tiled, shard)
            elif tiled:
                loss = tiled_causal_lm_loss(
                    h, self.lm_head.weight, labels, out.cu_seqlens, chunk_size=self.config.loss_chunk_size
                )
            else:
                loss = causal_lm_loss(logits.reshape(*h.shape[:2], -1), labels, out.cu_seqlens)
            aux = self.model.aux_loss() if self.training else None
            if aux is not None:
                loss = loss + aux
        return ZooCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            aux_loss=aux,
            **{_OUTPUT_CACHE_FIELD: getattr(out, _OUTPUT_CACHE_FIELD)},
        )


    def _sequence_parallel_loss(self, h, logits, labels, tiled: bool, shard) -> torch.Tensor:
        """The whole sequence group's next-token loss from this rank's slice (see ``sequence.group_mean_loss``)."""
        targets = sequence.next_token_targets(labels.to(h.device), shard).reshape(-1)
        count = (targets != IGNORE_INDEX).sum()
        if int(count) == 0:
            local = h.sum() * 0.0  # nothing to predict here; keeps this rank in the backward
        elif tiled:
            local = tiled_linear_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets, chunk_size=self.config.loss_chunk_size,
                with_preds=False,
            )[0]
        else:
            local = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX)
        return sequence.group_mean_loss(local, count, shard)


class ZooForSequenceClassification(ZooPreTrainedModel):
    """Classification / regression head on pooled hidden states.

    Pooling ``auto``: the last real token for causal stacks, the masked mean when any mixer is bidirectional.
    """

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ZooModel(config)
        self.score = self._new_head(config.num_labels)
        self.post_init()

    def _pooling(self) -> str:
        if self.config.pooling != "auto":
            return self.config.pooling
        return "last" if all(block.mixer.causal for block in self.model.layers) else "mean"

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """Pooled logits (and, with ``labels``, cross entropy, or MSE when ``num_labels == 1``)."""
        _reject_unknown(kwargs, type(self).__name__ + ".forward")
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state  # (B, L, D)
        B, L, _ = h.shape
        mask = attention_mask.to(h.device) if attention_mask is not None else torch.ones(B, L, device=h.device)
        if self._pooling() == "mean":
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        else:
            # Last real token (works for right and left padding).
            pos = torch.arange(L, device=h.device).expand(B, L)
            last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).amax(1).clamp_min(0)
            pooled = h[torch.arange(B, device=h.device), last]
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
            aux = self.model.aux_loss() if self.training else None
            if aux is not None:
                loss = loss + aux
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states)
