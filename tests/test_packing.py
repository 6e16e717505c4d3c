"""zoo.packing: one validator and one rule for packed documents, held by every kernel.

The rule (zoo/packing.py): empty documents are accepted; they change no output, and where a kernel returns a
final state per document an empty document's final state is its initial state (zeros when none is given).
Each kernel is checked on both backends: packing with empty documents (first, in the middle, twice in a row,
last) equals packing without them, in outputs, per-document final states and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import causal_conv1d, chunk_delta_rule, chunk_gla, linear_scan, selective_scan, ssd
from zoo.packing import (
    last_inputs,
    packed_cu_seqlens,
    seq_ids,
    seq_index,
    sequence_starts,
    validate_cu_seqlens,
)

F64 = torch.float64
PLAIN = torch.tensor([0, 3, 7, 12])
WITH_EMPTY = torch.tensor([0, 0, 3, 3, 3, 7, 12, 12])  # documents 0, 2, 3 and 6 are empty
KEPT = torch.tensor([1, 4, 5])  # WITH_EMPTY's non-empty documents, in PLAIN's order
EMPTY = torch.tensor([0, 2, 3, 6])
T = 12
BACKENDS = ["torch", "triton"]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= 1e-9 * (1 + b.abs().max().item() if b.numel() else 1), f"{what}: max err {err:.3g}"


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _state_kernel_case(name):
    """(inputs, run(cu, h0) -> (out, final per document), state shape per document)."""
    if name == "linear_scan":
        a, b = torch.rand(1, T, 5, dtype=F64) * 0.9, _rand(1, T, 5)
        return (a, b), lambda cu, h0, be: linear_scan(a, b, h0, cu_seqlens=cu, backend=be), (5,)
    if name == "chunk_gla":
        q, k, v = _rand(1, T, 2, 4, seed=1), _rand(1, T, 2, 4, seed=2), _rand(1, T, 2, 3, seed=3)
        g = -torch.rand(1, T, 2, 4, dtype=F64)
        run = lambda cu, h0, be: chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,  # noqa: E731
                                           chunk_size=4 if be == "torch" else 16, backend=be)
        return (q, k, v, g), run, (2, 4, 3)
    if name == "chunk_delta_rule":
        q, k = F.normalize(_rand(1, T, 2, 4, seed=1), dim=-1), F.normalize(_rand(1, T, 2, 4, seed=2), dim=-1)
        v, beta, g = _rand(1, T, 2, 3, seed=3), torch.rand(1, T, 2, dtype=F64), -torch.rand(1, T, 2, dtype=F64)
        run = lambda cu, h0, be: chunk_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True,  # noqa: E731
                                                  cu_seqlens=cu, chunk_size=4 if be == "torch" else 16, backend=be)
        return (q, k, v, beta, g), run, (2, 4, 3)
    if name == "ssd":
        x, dt, A = _rand(1, T, 2, 3, seed=1), torch.rand(1, T, 2, dtype=F64), -torch.rand(2, dtype=F64)
        B, C = _rand(1, T, 1, 4, seed=2), _rand(1, T, 1, 4, seed=3)
        run = lambda cu, h0, be: ssd(x, dt, A, B, C, initial_state=h0, return_final_state=True, cu_seqlens=cu,  # noqa: E731
                                     chunk_size=4 if be == "torch" else 16, backend=be)
        return (x, dt, B, C), run, (2, 3, 4)
    raise AssertionError(name)


@pytest.mark.parametrize("with_h0, backend", [(False, "torch"), (True, "torch"), (True, "triton")])
@pytest.mark.parametrize("name", ["linear_scan", "chunk_gla", "chunk_delta_rule", "ssd"])
def test_empty_documents_in_state_kernels(name, with_h0, backend):
    inputs, run, sshape = _state_kernel_case(name)
    for t in inputs:
        t.requires_grad_(True)
    h0_all = _rand(len(WITH_EMPTY) - 1, *sshape, seed=9).requires_grad_(True) if with_h0 else None
    h0_plain = h0_all[KEPT] if with_h0 else None
    out_e, fin_e = run(WITH_EMPTY, h0_all, backend)
    out_p, fin_p = run(PLAIN, h0_plain, backend)
    _close(out_e, out_p, f"{name} outputs")
    _close(fin_e[KEPT], fin_p, f"{name} final states of the non-empty documents")
    want_empty = h0_all[EMPTY] if with_h0 else torch.zeros(len(EMPTY), *sshape, dtype=F64)
    _close(fin_e[EMPTY].to(F64), want_empty.detach() if with_h0 else want_empty, f"{name} final state of an empty document")
    w_out, w_fin = _rand(*out_p.shape, seed=11), _rand(*fin_p.shape, seed=12)
    leaves = [*inputs, *([h0_all] if with_h0 else [])]
    g_e = _grads((out_e * w_out).sum() + (fin_e[KEPT] * w_fin).sum() + fin_e[EMPTY].sum(), leaves)
    g_p = _grads((out_p * w_out).sum() + (fin_p * w_fin).sum(), leaves)
    for i, (ge, gp) in enumerate(zip(g_e[: len(inputs)], g_p[: len(inputs)])):
        _close(ge, gp, f"{name} gradient of input {i}")
    if with_h0:  # an empty document's state passes through: d final / d h0 is the identity there
        _close(g_e[-1][EMPTY], torch.ones(len(EMPTY), *sshape, dtype=F64), f"{name} gradient of an empty document's h0")
        _close(g_e[-1][KEPT], g_p[-1][KEPT], f"{name} gradient of h0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_documents_in_selective_scan(backend):
    E, N = 3, 4
    u, delta = _rand(1, E, T, seed=1), torch.rand(1, E, T, dtype=F64)
    A, B, C = -torch.rand(E, N, dtype=F64), _rand(1, N, T, seed=2), _rand(1, N, T, seed=3)
    y_e = selective_scan(u, delta, A, B, C, cu_seqlens=WITH_EMPTY, backend=backend)
    y_p = selective_scan(u, delta, A, B, C, cu_seqlens=PLAIN, backend=backend)
    _close(y_e, y_p, "selective_scan outputs")
    # A trailing empty document used to mark the last token as a document start (clamped index).
    y_one = selective_scan(u, delta, A, B, C, cu_seqlens=torch.tensor([0, T, T]), backend=backend)
    _close(y_one, selective_scan(u, delta, A, B, C, backend=backend), "selective_scan with one trailing empty document")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_documents_in_causal_conv1d(backend):
    x, w, b = _rand(1, 5, T, seed=1), _rand(5, 4, seed=2), _rand(5, seed=3)
    _close(causal_conv1d(x, w, b, "silu", cu_seqlens=WITH_EMPTY, backend=backend),
           causal_conv1d(x, w, b, "silu", cu_seqlens=PLAIN, backend=backend), "causal_conv1d outputs")


def test_conv_state_of_packed_documents():
    x = _rand(1, T, 5)
    st_e, st_p = last_inputs(x, 3, cu_seqlens=WITH_EMPTY), last_inputs(x, 3, cu_seqlens=PLAIN)
    _close(st_e[KEPT], st_p, "conv states")
    _close(st_e[EMPTY], torch.zeros(len(EMPTY), 5, 3, dtype=F64), "an empty document's conv state")
    _close(st_p[0], F.pad(x[0, :3].T, (0, 0)), "a 3-token document's state is its 3 inputs")
    _close(st_p[1, :, :], x[0, 4:7].T, "the last 3 of a 4-token document")


def test_position_helpers():
    assert seq_ids(WITH_EMPTY, T).tolist() == [1] * 3 + [4] * 4 + [5] * 5
    assert seq_index(WITH_EMPTY, T).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert sequence_starts(WITH_EMPTY, T).nonzero().flatten().tolist() == [0, 3, 7]
    assert sequence_starts(torch.tensor([0, T, T]), T).nonzero().flatten().tolist() == [0]


BAD = [
    (torch.tensor([0, 5, 3, 12]), "without decreasing"),
    (torch.tensor([0, 5, 11]), r"number of packed tokens \(12\)"),
    (torch.tensor([1, 5, 12]), "rise from 0"),
    (torch.tensor([0.0, 12.0]), "1-D integer tensor"),
    (torch.tensor([[0, 12]]), "1-D integer tensor"),
    (torch.tensor([12]), "1-D integer tensor"),
]


@pytest.mark.parametrize("cu, match", BAD)
def test_every_kernel_gives_the_one_validator_message(cu, match):
    calls = {
        "linear_scan": lambda: linear_scan(_rand(1, T, 2), _rand(1, T, 2), cu_seqlens=cu),
        "chunk_gla": lambda: chunk_gla(*(_rand(1, T, 1, 2) for _ in range(3)), -torch.rand(1, T, 1, dtype=F64), cu_seqlens=cu),
        "chunk_delta_rule": lambda: chunk_delta_rule(*(_rand(1, T, 1, 2) for _ in range(3)), torch.rand(1, T, 1, dtype=F64),
                                                     cu_seqlens=cu),
        "selective_scan": lambda: selective_scan(_rand(1, 2, T), torch.rand(1, 2, T, dtype=F64), -torch.rand(2, 3, dtype=F64),
                                                 _rand(1, 3, T), _rand(1, 3, T), cu_seqlens=cu),
        "causal_conv1d": lambda: causal_conv1d(_rand(1, 2, T), _rand(2, 4), cu_seqlens=cu),
        "packed_cu_seqlens": lambda: packed_cu_seqlens(1, T, cu_seqlens=cu),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert str(err.value).startswith(f"{op if op != 'packed_cu_seqlens' else 'cu_seqlens'}:"), str(err.value)


def test_batch_must_be_one():
    with pytest.raises(ValueError, match="must have batch size 1, got 2; concatenate"):
        validate_cu_seqlens(torch.tensor([0, 4]), 4, op="x", batch=2)
