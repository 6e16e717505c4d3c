"""The hybrid configs sequence-parallel on 2 and 4 gloo processes equal one process.

Samba (Mamba + sliding-window attention: LASP states, the conv halo and the window halo), Jamba (Mamba + attention
with a mixture-of-experts MLP, whose aux loss is over the whole sequence group) and MoM + attention, each shrunk to
a tiny width with untied embeddings (as tests/conftest.py's ``small_hybrid_config``): logits, loss and every
parameter gradient in fp32 at relative 1e-5, unpacked and packed (document boundaries inside and on slice edges, an
empty document); every mixer sees L / P tokens. One launch of the ranks per group size.
"""

from __future__ import annotations

import pytest
from sp_harness import assert_models_exact

from zoo.config import apply_overrides, read_yaml

VOCAB, D, L = 32, 32, 16
PACKINGS = [None, [0, 3, 8, 8, 13, 16], [0, 4, 16]]
#: config name -> (overrides, the number of layers the shrunk model has)
CONFIGS = {
    "samba": (["model.n_layers=4"], 4),
    "jamba": ([], 6),  # 3 MoE layers, the attention layer (GQA, K/V all-gather) at index 4
    "mom-attention": (["model.n_layers=3"], 3),
}


def _model(name: str) -> dict:
    """configs/NAME.yaml's model section at width 32: attention 4 heads, windows of 5, MoM head_dim 8, chunks of 4."""
    data = read_yaml(f"configs/{name}.yaml")
    mixers = data["model"].get("mixers", {})
    shrink = [f"model.vocab_size={VOCAB}", f"model.d_model={D}", "model.tie_word_embeddings=false"]
    if "attention" in mixers:
        shrink.append("model.mixers.attention.n_heads=4")
        if mixers["attention"].get("window"):
            shrink.append("model.mixers.attention.window=5")  # 4 keys before: a whole slice at P = 4
    if "mamba" in mixers:
        shrink.append("model.mixers.mamba.d_state=8")
    if "mom" in mixers:
        shrink += ["model.mixers.mom.head_dim=8", "model.mixers.mom.chunk_size=4"]
    if "layers" in data["model"]:
        data["model"]["layers"] = data["model"]["layers"][: CONFIGS[name][1]]
    return apply_overrides(data, [*shrink, *CONFIGS[name][0]])["model"]


@pytest.mark.parametrize("world", [2, 4])
def test_hybrid_configs_are_exact(world, tmp_path):
    assert_models_exact({name: (_model(name), CONFIGS[name][1]) for name in CONFIGS}, PACKINGS, world=world, tmp=tmp_path, length=L)
