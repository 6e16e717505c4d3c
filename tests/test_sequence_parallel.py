"""Sequence parallelism per architecture: a whole model split over 2 and 4 gloo processes equals one process.

For each recurrent mixer (two layers, so states also compose through depth): logits, loss (MoM's aux loss included)
and every parameter gradient, fp32 at relative 1e-5, unpacked and packed with document boundaries inside slices, on slice
edges and an empty document; every mixer sees L / P tokens (no full-length activations). All jobs of a world size
run in one launch of P processes.
"""

from __future__ import annotations

import pytest
from sp_harness import assert_models_exact

VOCAB, D, L = 32, 32, 16
PACKINGS = [None, [0, 3, 8, 8, 13, 16], [0, 4, 16]]

# mixer name -> its settings (each mixer's small test_settings, with chunks shorter than a slice)
MIXERS = {
    "mamba": ("mamba", {"d_state": 8}),
    "mamba2": ("mamba2", {"d_state": 8, "headdim": 8, "chunk_size": 4}),
    "retnet": ("retnet", {"n_heads": 2, "chunk_size": 4}),
    "retnet-parallel": ("retnet", {"n_heads": 2, "mode": "parallel"}),
    "hgrn": ("hgrn", {}),
    "hgrn-real": ("hgrn", {"variant": "real"}),
    "gateloop": ("gateloop", {"head_dim": 2}),
    "mingru": ("mingru", {}),
    "minlstm": ("minlstm", {}),
    "mom": ("mom", {"n_heads": 2, "head_dim": 8, "chunk_size": 4, "n_memories": 3, "top_k": 2}),
    "mom-gla": ("mom", {"n_heads": 2, "head_dim": 8, "chunk_size": 4, "memory": "gla", "shared_memory": False}),
}


def _model(name: str) -> dict:
    mixer, kwargs = MIXERS[name]
    return {"vocab_size": VOCAB, "d_model": D, "n_layers": 2, "pattern": [mixer], "mixers": {mixer: kwargs},
            "mlp": "swiglu", "tie_word_embeddings": False}


@pytest.mark.parametrize("world", [2, 4])
def test_recurrent_mixers_are_exact(world, tmp_path):
    assert_models_exact({name: (_model(name), 2) for name in MIXERS}, PACKINGS, world=world, tmp=tmp_path, length=L)
