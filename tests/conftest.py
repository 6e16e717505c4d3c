import os

# Triton kernels are tested on CPU tensors through the interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
