"""``ZooConfig``: one Hugging Face config for every architecture and any mix of mixers."""

from __future__ import annotations

from transformers import PreTrainedConfig

from zoo.models.hub import CONFIG_AUTO_MAP, write_code_file

#: What ``backend`` may say: kernels choose ("auto": Triton on CUDA tensors), or one backend for every kernel that
#: has it ("cuda": the optional mamba-ssm / causal-conv1d packages where they exist, Triton elsewhere).
BACKEND_SETTINGS = ("auto", "torch", "triton", "cuda")
#: How a classifier pools the sequence ("auto": the last real token for causal stacks, the mean otherwise).
POOLING = ("auto", "last", "mean")


class ZooConfig(PreTrainedConfig):
    """Vocabulary, width and the list of layers (each: mixer name + mixer kwargs + MLP kind).

    Layers are given either as ``pattern`` (mixer names repeated to ``n_layers``, as in Samba's
    ``[mamba, attention]``) with per-mixer kwargs in ``mixers``, or as an explicit ``layers`` list of
    ``{"mixer": name, "mlp": kind, <mixer kwargs>}``. After construction ``layers`` always holds the
    resolved form ``{"mixer", "mlp", "kwargs"}``, so a saved config is self-contained.
    """

    model_type = "zoo"

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 2
    pattern: list | None = None
    layers: list | None = None
    mixers: dict | None = None
    mlp: str = "swiglu"
    mlp_hidden: int | None = None
    moe: dict | None = None
    # Long sequences (docs/long-context.md). Tokens per tile of the training loss (LM head + cross entropy,
    # recomputed in backward; 0: full logits) and of the MLPs (each tile recomputed in backward when the
    # flattened batch has more tokens than this; 0: never tiled). Neither changes the results.
    loss_chunk_size: int = 1024
    mlp_chunk_size: int = 4096
    # With activation checkpointing, a causal recurrent block runs in sequence tiles of this many tokens, each
    # recomputed alone in backward, the mixer's state carried from tile to tile (as chunked prefill): only one
    # tile's working memory exists at a time. 0: a checkpointed block is recomputed whole.
    checkpoint_chunk_size: int = 4096
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    pooling: str = "auto"  # one of POOLING
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    use_cache: bool = True
    #: Kernel backend for every mixer ("auto" | "torch" | "triton" | "cuda"); a mixer's own ``backend`` overrides it.
    backend: str = "auto"

    def __post_init__(self, **kwargs):
        self.layers = resolve_layers(self.n_layers, self.pattern, self.layers, self.mixers or {}, self.mlp)
        self.n_layers = len(self.layers)
        if self.backend not in BACKEND_SETTINGS:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_SETTINGS)} (got {self.backend!r}).")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling must be one of {', '.join(POOLING)} (got {self.pooling!r}).")
        for key in ("loss_chunk_size", "mlp_chunk_size", "checkpoint_chunk_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be a whole number of tokens >= 0 (got {getattr(self, key)!r}); 0 disables tiling.")
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)
        # Saved into config.json: a fresh process loads the checkpoint with trust_remote_code=True (see zoo_hf.py).
        self.auto_map = dict(CONFIG_AUTO_MAP)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """A no-op: every saved ZooConfig already carries its ``auto_map`` (see :mod:`zoo.models.hub`)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedConfig.save_pretrained`` plus ``zoo_hf.py``, the code file its ``auto_map`` names."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_code_file(save_directory)
        return out

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def mixer_names(self) -> list[str]:
        return [spec["mixer"] for spec in self.layers]


def resolve_layers(n_layers: int, pattern: list | None, layers: list | None, mixers: dict, mlp: str) -> list[dict]:
    """Expand ``pattern``/``layers`` into ``[{"mixer": name, "mlp": kind, "kwargs": {...}}] * n_layers``.

    The one normalisation of the layer list (``zoo.config.validate_model`` checks its result): a layer is a mixer
    name or a mapping ``{"mixer": name, "mlp": kind, <mixer kwargs>}`` (or the resolved form, with ``kwargs``); its
    kwargs are the model's ``mixers.<name>`` settings updated by the layer's own.
    """
    if not layers:
        pattern = list(pattern or ["attention"])
        layers = [pattern[i % len(pattern)] for i in range(n_layers)]
    out = []
    for i, spec in enumerate(layers):
        spec = {"mixer": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or "mixer" not in spec:
            raise ValueError(f"layers[{i}]: each layer needs a 'mixer' name, e.g. {{mixer: mamba}}.")
        spec = dict(spec)
        name = spec.pop("mixer")
        kind = spec.pop("mlp", mlp)
        kwargs = {**(mixers.get(name) or {}), **spec.pop("kwargs", {}), **spec}
        out.append({"mixer": name, "mlp": kind, "kwargs": kwargs})
    return out
