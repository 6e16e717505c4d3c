"""`zoo bench all`: one table with a row per registered mixer, per hybrid config and per peer-matched model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import zoo
from zoo.benchmarks import all as bench_all
from zoo.cli import main

TINY = ["--quick", "--d-model", "64", "--layers", "2", "--vocab", "64", "--length", "16", "--decode-prompt", "4",
        "--decode-tokens", "2", "--warmup", "0"]


def _rows(out: str) -> dict[str, list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    return {cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


def test_quick_table_has_a_row_per_architecture(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written next to the checkout's docs/
    png = tmp_path / "plot.png"
    assert main(["bench", "all", *TINY, "--plot", str(png), "--plot-lengths", "8", "16"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    expected = set(zoo.list_mixers()) | set(bench_all.hybrid_configs()) | {"attention+swiglu (Llama-shaped)"}
    expected |= {name for mod, name in (("minGRU_pytorch", "mingru+gelu (minLM-shaped)"),  # rows of installed peers
                                        ("gateloop_transformer", "gateloop+gelu (GateLoop-Transformer-shaped)"))
                 if importlib.util.find_spec(mod) is not None}
    assert {"samba", "jamba", "mom-attention"} <= set(bench_all.hybrid_configs())
    assert set(rows) == expected
    for name, cells in rows.items():
        assert not any(c.startswith("not run") for c in cells), (name, cells)
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # training and prefill tokens/s were measured
    # every causal mixer decodes; the bidirectional ones have no decode column
    for name in zoo.list_mixers():
        has_step = zoo.get_mixer(name).has_step and zoo.get_mixer(name).causal
        assert (rows[name][5] != "-") == has_step, name
    # the peers ran and each zoo row that has one carries the ratios
    for name, peer in (("mamba", "MambaForCausalLM"), ("mamba2", "Mamba2ForCausalLM"),
                       ("attention+swiglu (Llama-shaped)", "LlamaForCausalLM")):
        assert peer in rows[name][8] and rows[name][10].endswith("x") and rows[name][14].endswith("x"), rows[name]
        assert float(rows[name][15]) > 0 and rows[name][16].endswith("x"), rows[name]  # decode floor and its bound
    assert "peak train MiB" in out and "torch profiler" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.iterdir()) == [png]  # no record without --record


def test_only_and_no_peers_select_rows(capsys):
    assert main(["bench", "all", *TINY, "--no-peers", "--only", "mingru", "samba"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"mingru", "samba"}
    assert rows["mingru"][8] == "-"  # no peer column filled


def test_decode_floor_reads_every_weight_matrix_once():
    # tied head: the embedding is the head's weight and counts once; untied: the head is its own matrix
    for tied in (True, False):
        model = zoo.build_model({"model": {"vocab_size": 96, "d_model": 16, "n_layers": 2, "pattern": ["mamba"],
                                           "tie_word_embeddings": tied}})
        mats = bench_all._gemv_weights(model)
        shapes = sorted(tuple(m.shape) for m in mats)
        assert shapes.count((96, 16)) == 1, shapes
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        assert len(mats) == len(linears) + 1  # the layers' projections and the head; A_log (2-D) is no GEMV
        assert not any(m.shape == model.model.layers[0].mixer.A_log.shape for m in mats)
        assert bench_all.decode_floor(model, 2, torch.device("cpu")) > 0


def test_unknown_name_is_one_sentence():
    with pytest.raises(SystemExit, match="--only: no model named"):
        bench_all.main([*TINY, "--no-peers", "--only", "nope"])


LUCIDRAINS = [m for m in ("minGRU_pytorch", "gateloop_transformer") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(LUCIDRAINS), reason=f"optional peers not installed: {LUCIDRAINS} (pip install '.[bench]')")
def test_lucidrains_peers_fill_their_columns(capsys):
    mingru, gateloop = "mingru+gelu (minLM-shaped)", "gateloop+gelu (GateLoop-Transformer-shaped)"
    assert main(["bench", "all", *TINY, "--only", mingru, gateloop]) == 0
    rows = _rows(capsys.readouterr().out)
    for name, peer in ((mingru, "lucidrains minLM"), (gateloop, "lucidrains GateLoop Transformer")):
        cells = rows[name]
        assert cells[8].startswith(peer), cells
        assert cells[2] in cells[8], cells  # matched sizes: the peer's parameter count equals the zoo row's
        assert cells[10].endswith("x") and cells[12].endswith("x"), cells  # training and prefill ratios
    assert rows[mingru][14].endswith("x")  # minLM decodes through its hidden-state cache
    assert rows[gateloop][13] == "-"  # GateLoop's Transformer has no cache
