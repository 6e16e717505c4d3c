import os

# Triton kernels are tested on CPU tensors through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The compiled CPU loops (zoo/kernels/_compile.py) take seconds to compile per shape: tests run the eager code unless
# they force the compiled path (ZOO_CPU_COMPILE=always, at small shapes, against the float64 oracles).
os.environ.setdefault("ZOO_CPU_COMPILE", "never")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ----- shared property checks (one copy, used by the per-mixer and hybrid tests) --------------------------------
def small_kwargs(name: str, **extra) -> dict:
    """Mixer ``name``'s own small settings (its class's ``test_settings``) plus ``extra``, only keys it takes."""
    import zoo
    from zoo.config import mixer_schema

    cls = zoo.get_mixer(name)
    schema = mixer_schema(cls)
    return {k: v for k, v in {**cls.test_settings, **extra}.items() if k in schema}


def small_hybrid_config(name: str, *, vocab: int, d_model: int, overrides=(), n_layers: int | None = None,
                        max_listed_layers: int | None = None):
    """configs/NAME.yaml shrunk to a tiny width (attention 4 heads, windows of 5, MoM head_dim 16): a ZooConfig.

    ``n_layers`` replaces a pattern config's depth; ``max_listed_layers`` cuts an explicit ``layers:`` list.
    """
    from zoo.config import apply_overrides, read_yaml, validate_model

    data = read_yaml(f"configs/{name}.yaml")
    shrink = [f"model.vocab_size={vocab}", f"model.d_model={d_model}"]
    mixers = data["model"].get("mixers", {})
    if "attention" in mixers:
        shrink.append("model.mixers.attention.n_heads=4")
        if mixers["attention"].get("window"):
            shrink.append("model.mixers.attention.window=5")
    if "mom" in mixers:
        shrink.append("model.mixers.mom.head_dim=16")
    if n_layers is not None and "n_layers" in data["model"]:
        shrink.append(f"model.n_layers={n_layers}")
    if max_listed_layers is not None and "layers" in data["model"]:
        data["model"]["layers"] = data["model"]["layers"][:max_listed_layers]
    return validate_model(apply_overrides(data, [*shrink, *overrides])["model"])


def assert_decode_matches_forward(model, x: torch.Tensor, prefill: int, *, rtol=1e-3, atol=1e-4) -> None:
    """Prefill ``x[:, :prefill]`` into a cache, then decode token by token: the logits equal the full forward."""
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        out = [model(x[:, :prefill], past_key_values=cache, use_cache=True).logits]
        out += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(prefill, x.shape[1])]
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=rtol, atol=atol)


def assert_chunked_prefill_matches_forward(model, x: torch.Tensor, bounds, *, rtol=1e-3, atol=1e-4) -> None:
    """Prefill ``x`` in the chunks ``[(a, b), ...]`` into one cache: the logits equal the full forward."""
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache()
        parts = [model(x[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in bounds]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=rtol, atol=atol)


def assert_long_bf16_finite(module, d_model: int, length: int = 16384) -> None:
    """A bf16 module on one long random sequence: finite outputs and finite gradients of input and parameters."""
    x = torch.randn(1, length, d_model, dtype=torch.bfloat16, requires_grad=True)
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    assert all(torch.isfinite(p.grad.float()).all() for p in module.parameters() if p.grad is not None)


def assert_packed_equals_separate(model, docs, *, rtol=1e-3, atol=1e-4) -> None:
    """Documents packed into one row with ``cu_seqlens`` give each document's logits run alone."""
    lens = [d.shape[1] for d in docs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        out = model(torch.cat(docs, 1), cu_seqlens=cu).logits
        for d, a, b in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(out[:, a:b], model(d).logits, rtol=rtol, atol=atol)


def run_steps(mixer, x: torch.Tensor, state=None):
    """``mixer.step`` over every token of ``x (B, L, D)`` from ``state`` (zeros if None): outputs ``(B, L, D)``, last state."""
    state = state if state is not None else mixer.init_state(x.shape[0], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def cached_chunks(mixer, x: torch.Tensor, bounds):
    """A mixer fed ``x`` in the chunks ``[(a, b), ...]`` through one cache (prefill, chunked prefill, single-token
    steps): the joined outputs, the full forward to compare them with, and the cache."""
    from zoo.models.cache import RecurrentStateLayer, ZooCache

    full = mixer(x)
    cache = ZooCache([RecurrentStateLayer()])
    return torch.cat([mixer(x[:, a:b], cache=cache) for a, b in bounds], 1), full, cache


def assert_left_padded_decode_equals_separate(mixer, lens, extra: int, d_model: int, *, pad=torch.zeros,
                                              tol: float = 1e-10) -> None:
    """A mixer: left-padded prefill of sequences of lengths ``lens`` (float64), then ``extra`` decoding steps through
    one cache, equals each sequence run alone (relative error below ``tol``); ``pad`` fills the padding."""
    from zoo.models.cache import RecurrentStateLayer, ZooCache

    T, B = max(lens), len(lens)
    seqs = [torch.randn(1, n + extra, d_model, dtype=torch.float64) for n in lens]
    x = pad(B, T, d_model, dtype=torch.float64)  # what the pads hold must not matter
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        x[b, T - n :] = seqs[b][0, :n]
        mask[b, T - n :] = 1
    cache = ZooCache([RecurrentStateLayer()])
    outs = [mixer(x, cache=cache, attention_mask=mask)]
    for t in range(extra):
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        tok = torch.cat([s[:, lens[b] + t : lens[b] + t + 1] for b, s in enumerate(seqs)])
        outs.append(mixer(tok, cache=cache, attention_mask=mask))
    out = torch.cat(outs, dim=1)
    for b, n in enumerate(lens):
        ref = mixer(seqs[b])[0]
        assert ((out[b, T - n :] - ref).norm() / ref.norm().clamp_min(1e-30)).item() < tol


def assert_left_padded_batch_equals_separate(model, lens, vocab: int, *, rtol=1e-3, atol=1e-4,
                                             max_new_tokens: int = 4) -> None:
    """A causal LM on a left-padded batch of two sequences (lengths ``lens``): logits equal each sequence run alone,
    and greedy ``generate`` continues each as it does alone."""
    a, b = torch.randint(1, vocab, (1, lens[0])), torch.randint(1, vocab, (1, lens[1]))
    T, pad = max(lens), lens[0] - lens[1]
    batch = torch.zeros(2, T, dtype=torch.long)
    batch[0], batch[1, pad:] = a[0], b[0]
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(out[0], model(a).logits[0], rtol=rtol, atol=atol)
        torch.testing.assert_close(out[1, pad:], model(b).logits[0], rtol=rtol, atol=atol)
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        alone = model.generate(b, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    assert torch.equal(gen[1, T:], alone[0, lens[1] :])


def load_script(name: str):
    """``scripts/<name>.py`` imported as module ``name`` (once: dataclasses look their module up in sys.modules)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
