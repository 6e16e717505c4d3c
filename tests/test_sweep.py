"""The MQAR sweep runner: a tiny two-model grid writes the CSV and both plots; bad sweep configs fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import zoo
from zoo import sweep as sw


def recurrent_mixer() -> str | None:
    """The first registered recurrent mixer among the preferred ones (None when none is registered)."""
    names = zoo.list_mixers()
    return next((m for m in ("mamba", "hgrn", "mingru") if m in names), None)


def tiny_sweep(tmp_path, mixers, **sweep_over) -> str:
    cfg = {
        "sweep": {"name": "tiny", "mixers": mixers, "widths": [16, 32], "settings": [[16, 2]],
                  "lrs": [1e-3, 3e-3], "out": str(tmp_path / "out"), **sweep_over},
        "model": {"vocab_size": 32, "mlp": "none", "mixers": {"attention": {"n_heads": 2}}},
        "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                  "progress": False},
        "task": {"name": "mqar", "vocab_size": 32, "num_train": 16, "num_test": 8},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_tiny_grid_writes_csv_and_both_plots(tmp_path, monkeypatch):
    rec = recurrent_mixer()
    assert rec is not None, "a recurrent mixer (mamba, hgrn or mingru) must be registered"
    sweep = sw.load_sweep(tiny_sweep(tmp_path, ["attention", rec]))
    paths = sw.run_sweep_config(sweep, progress=False)
    rows = sw.read_rows(paths["csv"])
    assert len(rows) == 2 * 2 * 1 * 2  # mixers x widths x settings x lrs
    assert {r["mixer"] for r in rows} == {"attention", rec}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 3 for r in rows)
    assert sum(r["best"] for r in rows) == 4  # one best lr per (mixer, width, setting)
    att = [r for r in rows if r["mixer"] == "attention"]
    assert all(r["state_size"] == 2 * 2 * r["d_model"] * r["seq_len"] for r in att)  # 2 layers x (K+V) x width x L
    for key in ("width_png", "state_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny-width.png" in paths["report"].read_text()

    # A second run reuses the finished rows instead of training again.
    monkeypatch.setattr(sw, "run_one", lambda run: pytest.fail("finished runs must not be trained again"))
    sw.run_sweep_config(sweep, progress=False)
    assert "attention" in sw.summary(sw.read_rows(paths["csv"]))
    wider = sw.load_sweep(tiny_sweep(tmp_path, ["attention", rec], widths=[16, 32, 64]))
    sw.run_sweep_config(wider, progress=False, plots_only=True)  # redraws from the CSV, trains nothing
    assert len(sw.read_rows(paths["csv"])) == 8


def test_plots_only_without_results_fails(tmp_path):
    sweep = sw.load_sweep(tiny_sweep(tmp_path, ["attention"]))
    with pytest.raises(sw.SweepError, match="holds no finished run.*without --plots-only"):
        sw.run_sweep_config(sweep, progress=False, plots_only=True)


def test_mark_best_picks_the_highest_accuracy_per_cell():
    base = {"mixer": "m", "d_model": 8, "seq_len": 16, "num_kv_pairs": 2}
    rows = [{**base, "lr": 1e-3, "accuracy": 0.2}, {**base, "lr": 1e-2, "accuracy": 0.7},
            {**base, "d_model": 16, "lr": 1e-3, "accuracy": 0.1}]
    sw.mark_best(rows)
    assert [r["best"] for r in rows] == [0, 1, 1]


def test_all_expands_to_every_causal_registered_mixer(tmp_path):
    sweep = sw.load_sweep(tiny_sweep(tmp_path, "all"))
    names = sweep.mixer_names()
    assert "attention" in names
    assert all(zoo.get_mixer(m).causal for m in names)


def test_unknown_mixer_fails_naming_the_choices(tmp_path):
    sweep = sw.load_sweep(tiny_sweep(tmp_path, ["attention", "transformerxl"]))
    with pytest.raises(sw.SweepError, match="unknown mixer 'transformerxl'; choose from"):
        sweep.runs()


def test_bad_setting_fails_naming_the_expected_pair(tmp_path):
    with pytest.raises(sw.SweepError, match=r"sweep.settings\[0\].*pair \[seq_len, num_kv_pairs\]"):
        sw.load_sweep(tiny_sweep(tmp_path, ["attention"], settings=[[64]]))


def test_unknown_sweep_key_fails_with_a_suggestion(tmp_path):
    with pytest.raises(sw.SweepError, match="sweep.width: unknown key. Did you mean 'widths'"):
        sw.load_sweep(tiny_sweep(tmp_path, ["attention"], width=[3]))


def test_impossible_width_fails_before_training(tmp_path):
    path = tiny_sweep(tmp_path, ["attention"])
    sweep = sw.load_sweep(path, ["model.mixers.attention.n_heads=3"])
    with pytest.raises(sw.SweepError, match="width_overrides"):
        sw.run_sweep_config(sweep, progress=False)


@pytest.mark.parametrize("name", ["mqar-cpu", "mqar-full"])
def test_shipped_sweeps_validate(name):
    sweep = sw.load_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / f"{name}.yaml")
    for run in sweep.runs():
        zoo.load_config(run["config"])
