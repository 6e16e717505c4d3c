"""The common block interface every sequence mixer keeps.

A mixer maps ``(B, L, D) -> (B, L, D)``. It is built by the registry as
``cls(d_model, layer_idx=i, **kwargs)`` where ``kwargs`` come from the layer's YAML; the constructor's
keyword-only arguments (with the paper's defaults and type hints) are the config schema, so config
validation reads them from the signature.

Conventions shared by all mixers:

* ``attention_mask`` is ``(B, T)`` with 1 for real tokens and 0 for padding, where the **last**
  ``L`` columns belong to ``x`` (during decoding ``T`` also covers the cached prefix). A recurrent mixer
  must leave its state unchanged at padded positions (decay 1, input 0), so left-padded batches equal
  separate sequences.
* ``cu_seqlens`` is ``(N + 1,)`` int32/int64 cumulative sequence starts for ``B == 1`` packed input:
  no information crosses a boundary (states reset, convolutions do not reach back across it).
* state is a ``dict[str, Tensor]`` whose tensors all have batch as dim 0 (beam search reorders them
  generically). It lives in the model's cache (``zoo.models.cache``): ``get_state`` / ``set_state``.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn

from zoo.models.cache import RecurrentStateLayer, get_state, set_state

State = dict[str, torch.Tensor]


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without the dispatch of a no-op ``.to`` (decode steps are overhead-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


class Mixer(nn.Module, metaclass=ABCMeta):
    """Base class of every mixer. Subclasses set ``causal`` and implement forward, step, state_size."""

    causal: bool = True
    #: False for mixers with no O(1) step path (bidirectional ones).
    has_step: bool = True
    mixer_name: str = "?"
    # Facts about the architecture, read by the docs generator (scripts/gen_arch_docs.py), `zoo list` and the
    # shared property tests (tests/conftest.py): a new mixer declares them here and nothing else changes.
    #: (title, authors and year, arXiv id) of the paper.
    paper: tuple[str, str, str] | None = None
    #: Heading prefix of the mixer's section in math.md, e.g. "## Mamba-2".
    math_section: str | None = None
    #: The state size in words (``state_size()`` is the code that computes it).
    state_formula: str | None = None
    #: Small constructor settings under which the shared property tests run in seconds on CPU.
    test_settings: dict = {}
    #: The kernel backend setting ("auto", "torch", "triton", "cuda"; None = auto), set by the model from
    #: ``model.backend`` / ``model.mixers.<name>.backend``; pass ``self.kernel_backend(op)`` to every kernel call.
    backend: str | None = None

    def kernel_backend(self, op: str) -> str | None:
        """This mixer's backend setting as the ``backend`` argument of kernel ``op`` (see ``backend_for``)."""
        from zoo.kernels._dispatch import backend_for

        return backend_for(self.backend, op)

    def __init__(self, d_model: int, *, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx
        #: Auxiliary loss of the last forward (MoE/MoM routers); the model adds every one it finds to the LM loss.
        self.aux_loss: torch.Tensor | None = None

    # ----- what a mixer implements -------------------------------------------------------------
    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        *,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        """Parallel path (training, prefill); with ``cache`` it continues from and updates the layer's state."""

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x (B, D)`` and the state after the prefix -> ``y (B, D)`` and the new state."""
        raise RuntimeError(
            f"mixer {self.mixer_name!r} is not causal and has no step (decoding) path; use it in an encoder "
            "(ZooForSequenceClassification) or pick a causal mixer for generation."
        )

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """The state before any token (zeros)."""
        raise RuntimeError(f"mixer {self.mixer_name!r} has no recurrent state.")

    @abstractmethod
    def state_size(self, seq_len: int | None = None) -> int:
        """Floats of recurrent state per sequence (a complex number counts 2).

        Recurrent mixers ignore ``seq_len``; attention reports its KV cache at that length (per token if None).
        """

    def cache_layer(self):
        """The transformers cache layer that holds this mixer's decoding state."""
        return RecurrentStateLayer()

    # ----- parameters shared across layers (e.g. HGRN's layer-wise lower bound) --------------------
    @classmethod
    def build_shared(cls, *, d_model: int, layer_indices: list[int], n_layers: int, kwargs: list[dict]) -> nn.Module | None:
        """A module owned by the model and shared by all layers of this mixer type (default: none).

        ``layer_indices`` are the global indices of this mixer's layers, ``kwargs`` their configs.
        """
        return None

    def bind_shared(self, module: nn.Module) -> None:
        # Stored outside ``_modules`` so the parameters are registered once, by the model.
        object.__setattr__(self, "shared", module)


class RecurrentMixer(Mixer):
    """Template for causal recurrent mixers: implement ``scan`` (parallel/chunked), ``step`` and ``init_state``.

    ``forward`` then handles the cache: prefill (or chunked prefill) continues from the cached state,
    a single token with a cached state takes the O(1) step path, and padded decode tokens keep the state.
    """

    #: The model may run this mixer's checkpointed blocks in sequence tiles, carrying the state between them
    #: (``ZooConfig.checkpoint_chunk_size``); False for a mixer whose forward is not a function of (tile, state)
    #: alone, e.g. one whose auxiliary loss is computed over the whole sequence.
    sequence_tiles: bool = True

    @abstractmethod
    def scan(self, x: torch.Tensor, *, state: State | None = None, mask: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None, return_state: bool = False) -> tuple[torch.Tensor, State | None]:
        """Parallel/chunked path. ``mask (B, L)`` bool/0-1 or None. Returns ``y`` and, if asked, the final state."""

    @abstractmethod
    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: ``x (B, D)`` and the state after the prefix -> ``y (B, D)`` and the new state."""

    @abstractmethod
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        """The state before any token (zeros)."""

    def forward(self, x, *, cache=None, attention_mask=None, cu_seqlens=None):
        L = x.shape[1]
        mask = attention_mask[:, -L:] if attention_mask is not None else None
        if cache is None:
            return self.scan(x, mask=mask, cu_seqlens=cu_seqlens)[0]
        state = get_state(cache, self.layer_idx)
        if state is not None and L == 1 and cu_seqlens is None:
            y, new = self.step(x[:, 0], state)
            if mask is not None:
                keep = mask[:, 0].bool()
                new = {k: torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v, state[k]) for k, v in new.items()}
            y = y[:, None]
        else:
            y, new = self.scan(x, state=state, mask=mask, cu_seqlens=cu_seqlens, return_state=True)
        set_state(cache, self.layer_idx, new, n_tokens=L)
        return y
