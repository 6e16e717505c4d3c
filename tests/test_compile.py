"""``torch.compile`` (inductor, CPU) of every registered mixer's model equals eager.

Default suite: per registered mixer (1 layer, d_model 32) a Dynamo + AOT-autograd capture (``aot_eager``) of the
eval forward with ``fullgraph=True`` for every mixer that compiles into one graph; for the others the test pins
where the graph breaks are (so a new one fails here). Slow (``-m slow``), with inductor's C++ codegen: the eval
forward of every mixer and variant, a training step (loss and every gradient), packed input (``cu_seqlens``), a
dynamic sequence length and the shrunk hybrid configs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_hybrid_config, small_kwargs
from torch._dynamo.testing import CompileCounterWithBackend

import zoo
from zoo.config import read_yaml
from zoo.models import ZooConfig, ZooForCausalLM, ZooForSequenceClassification

V, D = 61, 32
# Code paths a mixer's defaults do not reach: case id -> (mixer, kwargs on top of its test_settings).
VARIANTS = {
    "attention-window": ("attention", {"window": 5}),  # the blocked sliding-window path (L > window)
    "attention-bidirectional": ("attention", {"causal": False}),
    "s4-bidirectional": ("s4", {"bidirectional": True}),
    "retnet-parallel": ("retnet", {"mode": "parallel"}),
    "mom-gla": ("mom", {"memory": "gla"}),
}
# Mixers whose routing sizes are data (how many tokens each memory gets), so the graph must break there.
# name -> {(file suffix, function)} of every allowed graph break; any other break fails the test.
ALLOWED_BREAKS = {
    "mom": {
        ("zoo/mixers/mom.py", "scan"),  # per-memory split sizes (.tolist()) for the per-memory projections
        ("zoo/kernels/delta_rule/__init__.py", "_check"),  # cu_seqlens validation reads its values
        ("zoo/kernels/delta_rule/chunked.py", "_chunk_layout"),  # chunks per routed sequence
        ("zoo/kernels/gla/__init__.py", "_check"),  # memory: gla
        ("zoo/packing.py", "packed_index"),
    },
}
ALL_CASES = [*zoo.list_mixers(), *(c for c, (m, _) in VARIANTS.items() if m in zoo.list_mixers())]


def _kwargs(case: str) -> tuple[str, dict]:
    name, extra = VARIANTS.get(case, (case, {}))
    return name, small_kwargs(name, **extra)


def _causal(case: str) -> bool:
    name, kw = _kwargs(case)
    return bool(zoo.get_mixer(name)(D, **kw).causal)


def _build(cfg: ZooConfig, seed: int = 0):
    """A causal LM, or a classifier when any layer is bidirectional."""
    torch.manual_seed(seed)
    model = ZooForCausalLM(cfg)
    if all(block.mixer.causal for block in model.model.layers):
        return model
    torch.manual_seed(seed)
    return ZooForSequenceClassification(cfg)


def make(case: str, *, n_layers: int = 1):
    name, kw = _kwargs(case)
    cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=n_layers, pattern=[name], mixers={name: kw}, mlp="swiglu",
                    tie_word_embeddings=False, num_labels=3)
    return _build(cfg)


def small_hybrid(config: str):
    mamba = "mamba" in read_yaml(f"configs/{config}.yaml")["model"].get("mixers", {})
    over = ["model.tie_word_embeddings=false", *(["model.mixers.mamba.d_state=8"] if mamba else [])]
    # jamba: its first 5 listed layers hold mamba + the moe MLP, and the attention layer
    return _build(small_hybrid_config(config, vocab=V, d_model=D, overrides=over, n_layers=2, max_listed_layers=5))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every test compiles new modules: without a reset the recompile limit would silently fall back to eager.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(model, backend: str = "inductor", **kw):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model, backend=counter, **kw), counter


def _out(model, x, **kw):
    out = model(x, **kw)
    return out.logits


def _graph_breaks(model, *args, **kwargs) -> tuple[int, set[tuple[str, str]]]:
    """Number of graphs and the (file, function) of every graph break Dynamo takes in ``model(*args, **kwargs)``."""
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    where = set()
    for brk in explained.break_reasons:
        frame = brk.user_stack[-1]
        path = frame.filename.replace("\\", "/")
        where.add((path[path.rfind("zoo/"):] if "zoo/" in path else path, frame.name))
    return explained.graph_count, where


@pytest.mark.parametrize("case", zoo.list_mixers())
def test_forward_captures_in_one_graph_and_equals_eager(case):
    # Dynamo capture + AOT autograd without inductor's C++ codegen (seconds instead of ~30 s of gcc per mixer):
    # catches graph breaks and Dynamo failures (e.g. the guard IndexError that a break inside an autograd.Function
    # caused in mamba). Inductor itself runs in the slow tests below.
    model = make(case).eval()
    x = torch.randint(0, V, (2, 12))
    if case in ALLOWED_BREAKS:  # Dynamo's own capture (which runs the graphs) and where it breaks; values: slow tests
        with torch.no_grad():
            n_graphs, breaks = _graph_breaks(model, x)
        assert n_graphs >= 1
        unexpected = {b for b in breaks if b not in ALLOWED_BREAKS[case]}
        assert not unexpected, f"{case}: graph breaks outside the routing: {sorted(unexpected)}"
        return
    compiled, counter = _compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES)
def test_inductor_forward_equals_eager(case):
    model = make(case).eval()
    x = torch.randint(0, V, (2, 12))
    compiled, counter = _compile(model, fullgraph=_kwargs(case)[0] not in ALLOWED_BREAKS)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count >= 1


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_training_step(model, x, y):
    compiled, counter = _compile(model)
    loss_c, grads_c = _loss_and_grads(compiled, x, y)
    grads_c = {n.removeprefix("_orig_mod."): g for n, g in grads_c.items()}  # torch.compile's wrapper names
    loss_e, grads_e = _loss_and_grads(model, x, y)
    assert counter.frame_count >= 1
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES)
def test_compiled_training_step_equals_eager(case):
    model = make(case).train()
    x = torch.randint(0, V, (2, 12))
    y = x if isinstance(model, ZooForCausalLM) else torch.tensor([0, 2])
    _check_training_step(model, x, y)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ALL_CASES if _causal(c)])
def test_compiled_packed_forward_equals_eager(case):
    model = make(case).eval()
    x = torch.randint(0, V, (1, 15))
    cu = torch.tensor([0, 9, 15], dtype=torch.int32)
    compiled, counter = _compile(model)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x, cu_seqlens=cu), _out(model, x, cu_seqlens=cu), rtol=1e-5, atol=1e-5)
        # The same compiled model on another packing of the same length (new tensor values, no new shapes).
        cu2 = torch.tensor([0, 4, 11, 15], dtype=torch.int32)
        torch.testing.assert_close(_out(compiled, x, cu_seqlens=cu2), _out(model, x, cu_seqlens=cu2), rtol=1e-5, atol=1e-5)
    assert counter.frame_count >= 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ALL_CASES)
def test_compiled_dynamic_length_equals_eager(case):
    model = make(case).eval()
    compiled, counter = _compile(model, dynamic=True)
    with torch.no_grad():
        for L in (12, 21):
            x = torch.randint(0, V, (2, L))
            torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count >= 1


HYBRIDS = ["samba", "jamba", "mom-attention", "hgrn-swa"]


@pytest.mark.slow
@pytest.mark.parametrize("config", HYBRIDS)
def test_compiled_hybrid_forward_and_training_step_equal_eager(config):
    model = small_hybrid(config).eval()
    x = torch.randint(0, V, (2, 12))  # longer than the shrunk window (5): the blocked sliding-window path
    compiled, counter = _compile(model)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count >= 1
    torch._dynamo.reset()
    _check_training_step(model.train(), x, x)
