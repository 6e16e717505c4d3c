"""Long sequences on one device: tiled LM loss, per-block activation checkpointing, tiled MLPs, CPU offload."""

import pytest
import torch
import torch.nn.functional as F

from zoo.models import ZooConfig, ZooForCausalLM, modeling
from zoo.models.loss import causal_lm_loss, tiled_causal_lm_loss
from zoo.nn.mlp import GeluMLP, SwiGLU

V, D = 101, 32


def hybrid(tie=False, n_layers=2, **kw):
    return ZooConfig(
        vocab_size=V, d_model=D, n_layers=n_layers, pattern=["mamba2", "attention"], tie_word_embeddings=tie,
        mixers={"attention": {"n_heads": 4}, "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8}}, **kw,
    )


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return ZooForCausalLM(cfg).train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=y, **kw)
    out.loss.backward()
    return out, grads(model)


def batch(B=2, L=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, L), generator=g)
    y = x.clone()
    y[0, 3:6] = -100
    y[-1, -4:] = -100
    return x, y


def assert_grads_close(a, b, **tol):
    assert a.keys() == b.keys() and len(a) > 0
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=lambda m, n=n: f"{n}: {m}", **tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-3))])
@pytest.mark.parametrize("packed", [False, True])
def test_tiled_loss_equals_untiled(dtype, tol, packed):
    torch.manual_seed(0)
    B, L = (1, 37) if packed else (3, 13)
    h = torch.randn(B, L, D, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, V, (B, L))
    y[0, 2:5] = -100
    cu = torch.tensor([0, 10, 11, 30, 37]) if packed else None
    ref = causal_lm_loss(F.linear(h, w), y, cu)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    for chunk in (1, 5, 64):
        got = tiled_causal_lm_loss(h, w, y, cu, chunk_size=chunk)
        th, tw = torch.autograd.grad(got * 1.7, (h, w))
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(th, gh, **tol)
        torch.testing.assert_close(tw, gw, **tol)
    assert float(gh.float().abs().max()) > 0 and float(gw.float().abs().max()) > 0


@pytest.mark.parametrize("tie", [False, True])
def test_model_tiled_loss_and_every_gradient_equal_untiled(tie):
    model = make(hybrid(tie=tie, loss_chunk_size=7))
    x, y = batch()
    tiled, g_tiled = run(model, x, y)
    assert tiled.logits is None  # no (B, L, V) logits in training with labels
    full, g_full = run(model, x, y, return_logits=True)
    assert full.logits.shape == (2, 23, V)
    torch.testing.assert_close(tiled.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g_tiled, g_full, rtol=1e-5, atol=1e-7)
    model.config.loss_chunk_size = 0  # the untiled path
    untiled, g_untiled = run(model, x, y)
    assert untiled.logits is not None
    assert_grads_close(g_tiled, g_untiled, rtol=1e-5, atol=1e-7)


def test_model_tiled_loss_bf16_autocast_close_to_untiled():
    model = make(hybrid(loss_chunk_size=5))
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled, g_tiled = run(model, x, y)
        full, g_full = run(model, x, y, return_logits=True)
    assert full.logits.dtype == torch.bfloat16
    torch.testing.assert_close(tiled.loss, full.loss, rtol=1e-2, atol=1e-2)
    for n in g_full:
        err = (g_tiled[n] - g_full[n]).abs().max() / g_full[n].abs().max().clamp_min(1e-12)
        assert err < 3e-2, (n, float(err))


def test_packed_rows_tiled_loss_respects_document_boundaries():
    model = make(hybrid(loss_chunk_size=4))
    x, y = batch(B=2, L=12)
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # row 0 holds two documents
    tiled, g_tiled = run(model, x, y, position_ids=pos)
    full, g_full = run(model, x, y, position_ids=pos, return_logits=True)
    torch.testing.assert_close(tiled.loss, full.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g_tiled, g_full, rtol=1e-5, atol=1e-7)
    # The loss really skips the cross-document predictions: token 4 of row 0 predicts nothing, the
    # last token of row 0 does not predict the first of row 1.
    logits = full.logits.reshape(1, 24, V)
    tgt = y.reshape(1, 24)
    cu = torch.tensor([0, 5, 12, 24])
    assert torch.allclose(full.loss, causal_lm_loss(logits, tgt, cu))
    assert not torch.allclose(full.loss, causal_lm_loss(logits, tgt, None))


def test_eval_mode_and_logits_to_keep_return_logits():
    model = make(hybrid(loss_chunk_size=4)).eval()
    x, y = batch()
    with torch.no_grad():
        out = model(x, labels=y)
        assert out.logits.shape == (2, 23, V)
        torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, y))
        last = model(x, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixers", [None, ["attention"], ["mamba2"]])
def test_checkpointing_gradients_equal_no_checkpointing(mixers, monkeypatch):
    model = make(hybrid(loss_chunk_size=6))
    x, y = batch()
    ref_out, ref = run(model, x, y)
    calls = []
    model.gradient_checkpointing_enable(mixers=mixers)
    func = model.model._gradient_checkpointing_func

    def counting(fn, block, *args):
        calls.append(type(block.mixer).__name__)
        return func(fn, block, *args)

    model.model._gradient_checkpointing_func = counting
    out, got = run(model, x, y)
    assert len(calls) == (2 if mixers is None else 1)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    assert_grads_close(got, ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no recomputation without grad
        calls.clear()
        model(x, labels=y)
        assert calls == []
    model.gradient_checkpointing_disable()
    calls.clear()
    run(model, x, y)
    assert calls == []


def test_checkpointing_unknown_mixer_is_refused():
    model = make(hybrid())
    with pytest.raises(ValueError, match="no mixer"):
        model.gradient_checkpointing_enable(mixers=["retnet"])


@pytest.mark.parametrize("cls", [SwiGLU, GeluMLP])
def test_tiled_mlp_equals_untiled(cls, monkeypatch):
    import zoo.nn.mlp as mlp_module

    tiles = []
    real = mlp_module.checkpoint
    monkeypatch.setattr(mlp_module, "checkpoint", lambda fn, t, **kw: tiles.append(t.shape) or real(fn, t, **kw))
    torch.manual_seed(0)
    mlp = cls(D, 48)
    x = torch.randn(3, 11, D, requires_grad=True)
    ref = mlp(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    mlp.chunk_size = 4  # 33 tokens -> 9 tiles, the last one short
    got = mlp(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x, *mlp.parameters()])
    assert tiles[0] == (4, D) and tiles[-1] == (1, D)  # each tile was checkpointed (and recomputed)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, rtol=1e-6, atol=1e-6)


def test_model_with_tiled_mlp_equals_untiled():
    x, y = batch()
    a, ga = run(make(hybrid(mlp_chunk_size=0)), x, y)
    tiled = make(hybrid(mlp_chunk_size=8))
    assert tiled.model.layers[0].mlp.chunk_size == 8
    b, gb = run(tiled, x, y)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(ga, gb, rtol=1e-5, atol=1e-7)
    tiled.gradient_checkpointing_enable()  # tiles checkpointed inside checkpointed blocks
    c, gc = run(tiled, x, y)
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(ga, gc, rtol=1e-5, atol=1e-7)


def test_chunk_sizes_are_validated():
    with pytest.raises(ValueError, match="mlp_chunk_size"):
        hybrid(mlp_chunk_size=-1)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        hybrid(loss_chunk_size=2.5)


def test_activation_offload_is_a_no_op_on_cpu(monkeypatch):
    x, y = batch()
    model = make(hybrid())
    _, ref = run(model, x, y)

    def refuse(*a, **k):
        raise AssertionError("save_on_cpu must not be used for CPU tensors")

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", refuse)
    model.gradient_checkpointing_enable(offload=True)
    assert model.model.activation_offload
    _, got = run(model, x, y)
    assert_grads_close(got, ref, rtol=1e-5, atol=1e-7)


def test_offload_context_uses_save_on_cpu_only_when_enabled(monkeypatch):
    entered = []

    class Spy:
        def __init__(self, pin_memory):
            entered.append(pin_memory)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Spy)
    for enabled, device in [(False, "cpu"), (True, "cpu"), (False, "cuda")]:
        with modeling.offload_context(enabled, torch.device(device)):
            pass
    assert entered == []
    with modeling.offload_context(True, torch.device("cuda")):
        pass
    assert entered == [True]


def test_offload_with_checkpointing_moves_only_block_inputs_and_keeps_gradients(monkeypatch):
    # The CUDA path run on CPU: save_on_cpu without pinning, forced for CPU tensors.
    x, y = batch()
    model = make(hybrid(n_layers=3))
    _, ref = run(model, x, y)
    packed = []

    class Offload(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self):
            super().__init__(lambda t: packed.append(tuple(t.shape)) or t.clone(), lambda t: t)

    monkeypatch.setattr(modeling, "offload_context", lambda enabled, device: Offload() if enabled else None)
    model.gradient_checkpointing_enable(offload=True)
    _, got = run(model, x, y)
    assert packed == [(2, 23, D)] * 3  # one saved input per checkpointed block, nothing else
    assert_grads_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA offload needs a GPU")
def test_activation_offload_on_cuda_gradients_equal():
    x, y = (t.cuda() for t in batch())
    model = make(hybrid()).cuda()
    _, ref = run(model, x, y)
    model.gradient_checkpointing_enable(offload=True)
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(t.device.type) or pack(t)

    torch.autograd.graph.save_on_cpu = Spy
    try:
        _, got = run(model, x, y)
    finally:
        torch.autograd.graph.save_on_cpu = real
    assert packed and set(packed) == {"cuda"}  # the saved block inputs went through the CPU offload
    assert_grads_close(got, ref, rtol=1e-4, atol=1e-6)


def test_train_config_memory_keys(tmp_path):
    from zoo.train.config import TrainConfig
    from zoo.train.loop import apply_memory_settings

    model = make(hybrid())
    apply_memory_settings(model, TrainConfig(activation_checkpointing=["attention"], activation_offload=True))
    assert model.model.gradient_checkpointing and model.model.checkpoint_mixers == {"attention"}
    assert model.model.activation_offload
    model = make(hybrid())
    apply_memory_settings(model, TrainConfig(activation_checkpointing=True))
    assert model.model.gradient_checkpointing and model.model.checkpoint_mixers is None
    model = make(hybrid())
    apply_memory_settings(model, TrainConfig())
    assert not model.model.gradient_checkpointing and not model.model.activation_offload
    with pytest.raises(ValueError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing="yes")
    with pytest.raises(ValueError, match="train.activation_checkpointing: .*no mixer"):
        apply_memory_settings(make(hybrid()), TrainConfig(activation_checkpointing=["retnet"]))


def test_yaml_keys_are_read():
    import zoo

    run = zoo.load_config({
        "model": {"pattern": ["mamba", "attention"], "d_model": 32, "mlp_chunk_size": 8, "loss_chunk_size": 0,
                  "mixers": {"attention": {"n_heads": 4}}},
        "train": {"activation_checkpointing": ["attention"], "activation_offload": True},
    })
    assert run.train.activation_checkpointing == ["attention"] and run.train.activation_offload
    assert run.model.mlp_chunk_size == 8 and run.model.loss_chunk_size == 0
    with pytest.raises(ValueError, match="activation_checkpointing"):
        zoo.load_config({"train": {"activation_checkpointing": "yes"}})


def test_zoo_train_step_tiles_the_head_and_equals_the_model_loss(monkeypatch):
    """`zoo train`'s step (lm_step) runs the LM head in tiles of loss_chunk_size rows, never over all positions,
    and its loss and gradients equal the model's own (untiled) loss."""
    from zoo.train.loop import _sparse_head, lm_step

    model = make(hybrid(loss_chunk_size=8))
    x, y = batch(B=2, L=23)
    assert _sparse_head(model)
    rows = []
    real_linear, real_mm = F.linear, torch.mm

    def head(weight):  # the head's weight or a transposed view of it
        return weight.data_ptr() == model.lm_head.weight.data_ptr()

    def spy(inp, weight, bias=None):
        if head(weight):
            rows.append(inp.shape[0])
        return real_linear(inp, weight, bias)

    def spy_mm(inp, other, **kw):
        if head(other):
            rows.append(inp.shape[0])
        return real_mm(inp, other, **kw)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    monkeypatch.setattr(torch, "mm", spy_mm)
    model.zero_grad(set_to_none=True)
    loss, _, preds, tgt, _ = lm_step(model, x, y, sparse=True)
    loss.backward()
    g_step = grads(model)
    monkeypatch.setattr(torch.nn.functional, "linear", real_linear)
    monkeypatch.setattr(torch, "mm", real_mm)
    assert rows and max(rows) <= 8 and sum(rows) >= tgt.numel()  # every labelled row, 8 at a time
    model.config.loss_chunk_size = 0
    ref, g_ref = run(model.eval(), x, y)  # eval mode: the full-logits loss
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g_step, g_ref, rtol=1e-5, atol=1e-6)
    mask = torch.nn.functional.pad(y[:, 1:], (0, 1), value=-100) != -100
    assert torch.equal(preds, ref.logits[mask].argmax(-1))


@pytest.mark.parametrize("name", ["mamba", "mamba2", "retnet", "hgrn", "mingru", "gateloop", "s4"])
def test_checkpointed_sequence_tiles_equal_whole_blocks(name):
    """checkpoint_chunk_size: a recurrent block recomputed tile by tile (state carried) = the plain forward/backward."""
    from conftest import small_kwargs

    cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=2, pattern=[name], mixers={name: small_kwargs(name)},
                    tie_word_embeddings=False, checkpoint_chunk_size=7, loss_chunk_size=0)
    model = make(cfg)
    x, y = batch(L=30)
    ref_out, ref = run(model, x, y)
    model.gradient_checkpointing_enable()
    tiles = []
    func = model.model._gradient_checkpointing_func
    model.model._gradient_checkpointing_func = lambda fn, *a: (tiles.append(fn.__name__), func(fn, *a))[1]
    out, got = run(model, x, y)
    assert tiles.count("_run_block_tile") == 2 * 5  # 30 tokens in tiles of 7: 5 per layer
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(got, ref, rtol=1e-4, atol=1e-6)
    model.config.checkpoint_chunk_size = 0  # whole blocks again
    tiles.clear()
    run(model, x, y)
    assert "_run_block_tile" not in tiles
