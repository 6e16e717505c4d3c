"""The one model family: ``ZooModel``, ``ZooForCausalLM``, ``ZooForSequenceClassification``.

No per-architecture copy of the modeling code: each layer is ``x + mixer(norm(x))`` then optionally
``x + mlp(norm(x))``, with the mixer picked from the registry by the config.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from zoo.models.cache import ZooCache
from zoo.models.configuration import ZooConfig
from zoo.models.packing import packed_cu_seqlens
from zoo.models.validation import check_inputs, check_labels
from zoo.nn import RMSNorm
from zoo.nn.mlp import build_mlp
from zoo.registry import get_mixer

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
        self.mixer = get_mixer(spec["mixer"])(config.d_model, layer_idx=layer_idx, **spec["kwargs"])
        kind = spec["mlp"]
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps) if kind != "none" else None
        self.mlp = build_mlp(kind, config.d_model, hidden=config.mlp_hidden, moe=config.moe) if kind != "none" else None

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

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel") -> None:
        """A no-op: every saved config carries the ``auto_map`` and code file (``ZooConfig.save_pretrained``).

        (transformers calls this when it loads the model through ``trust_remote_code``; its default would copy
        this package's source files into the next checkpoint saved.)
        """

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
        for block in self.layers:
            if hidden is not None:
                hidden.append(x)
            if self.gradient_checkpointing and self.training:
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

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (routers) left by the last forward, or None."""
        total = None
        for module in self.modules():
            a = getattr(module, "aux_loss", None)
            if isinstance(a, torch.Tensor):
                total = a if total is None else total + a
        return total


def _run_block(block: ZooBlock, x, attention_mask, cu_seqlens):
    return block(x, attention_mask=attention_mask, cu_seqlens=cu_seqlens)


@dataclass
class ZooCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None


class ZooForCausalLM(ZooPreTrainedModel, GenerationMixin):
    """Language model head on ``ZooModel``; ``generate()`` keeps states and KV in transformers' caches."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.model = ZooModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head._zoo_head = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

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
        **kwargs,
    ) -> ZooCausalLMOutput:
        """Logits (and, with ``labels``, the next-token loss). Arguments as in :meth:`ZooModel.forward`.

        With packed documents the loss never predicts a document's first token from the previous document.
        """
        _reject_unknown(kwargs, type(self).__name__ + ".forward")
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
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = aux = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position; call with logits_to_keep=0.")
            B, L = logits.shape[:2]
            if out.cu_seqlens is not None and B > 1:  # packed rows were run as one row: so is the loss
                loss = causal_lm_loss(logits.reshape(1, B * L, -1), labels.reshape(1, B * L), out.cu_seqlens)
            else:
                loss = causal_lm_loss(logits, labels, out.cu_seqlens)
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


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy: ``logits[:, t]`` predicts ``labels[:, t+1]``; -100 is ignored.

    With ``cu_seqlens`` the first token of each packed sequence is not predicted from the previous one.
    """
    labels = labels.to(logits.device)
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    if cu_seqlens is not None:
        ends = cu_seqlens.long()[1:-1] - 1  # last token of every sequence but the final one
        shifted[:, ends] = -100
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)


class ZooForSequenceClassification(ZooPreTrainedModel):
    """Classification / regression head on pooled hidden states.

    Pooling ``auto``: the last real token for causal stacks, the masked mean when any mixer is bidirectional.
    """

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ZooModel(config)
        self.score = nn.Linear(config.d_model, config.num_labels, bias=False)
        self.score._zoo_head = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

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
