"""The hybrid cache: recurrent states and attention KV pairs in transformers' own cache classes.

Attention layers use ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` (KV trimmed to the window);
recurrent layers use :class:`RecurrentStateLayer`, a ``LinearAttentionCacheLayerMixin`` holding the mixer's
named state tensors (batch on dim 0), so ``generate()`` (greedy, sampling, beam search) works unchanged.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

# transformers 5.24 gave the mixin several state slots (``number_of_states``); 5.5 takes no arguments.
_MIXIN_KWARGS = (
    {"number_of_states": 1} if "number_of_states" in inspect.signature(LinearAttentionCacheLayerMixin.__init__).parameters
    else {}
)


class RecurrentStateLayer(LinearAttentionCacheLayerMixin):
    """One recurrent layer's cache: a dict of named state tensors plus the count of tokens seen."""

    is_compileable = False
    is_sliding = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**_MIXIN_KWARGS)
        self.states: dict[str, torch.Tensor] | None = None
        self.seen_tokens = 0

    # transformers' conv/recurrent-state API is not used by zoo mixers; states go through get/set.
    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        return None

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise RuntimeError("zoo recurrent layers keep their state through zoo.models.cache.set_state.")

    update_recurrent_state = update_conv_state

    @property
    def batch_size(self) -> int:
        if not self.states:
            return -1
        return next(iter(self.states.values())).shape[0]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        self.states = None
        self.seen_tokens = 0

    def _apply(self, fn) -> None:
        if self.states is not None:
            self.states = {k: fn(v) for k, v in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        return None

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise RuntimeError("a recurrent state cannot be rolled back by tokens; re-run the prefix instead.")


class ZooCache(DynamicCache):
    """A DynamicCache whose layers are chosen per mixer (see ``ZooModel.new_cache``)."""

    def __init__(self, layers: list) -> None:
        super(DynamicCache, self).__init__(layers=layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_linear(self) -> list[bool]:
        # transformers 5.24 cuts the already-cached prefix off a prompt passed again to generate() only when some
        # layer is not "linear" (it cannot tell how many tokens a linear state has seen). Every zoo layer counts its
        # tokens (RecurrentStateLayer.seen_tokens), so the cut is always right: report no layer as linear.
        return [False] * len(self.layers)


def _layer(cache, layer_idx: int) -> RecurrentStateLayer:
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, RecurrentStateLayer):
        raise TypeError(
            f"cache layer {layer_idx} is {type(layer).__name__}, not a recurrent-state layer; build the cache with "
            "model.new_cache() (generate() does this for you)."
        )
    return layer


def get_state(cache, layer_idx: int) -> dict[str, torch.Tensor] | None:
    """The cached state of a recurrent layer, or None before its first token."""
    return _layer(cache, layer_idx).states


def set_state(cache, layer_idx: int, state: dict[str, torch.Tensor], n_tokens: int = 0) -> None:
    """Store a recurrent layer's new state after it consumed ``n_tokens`` tokens."""
    layer = _layer(cache, layer_idx)
    layer.states = state
    layer.seen_tokens += n_tokens
