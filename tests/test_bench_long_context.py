"""scripts/bench_long_context.py --quick: every case runs, the table is printed, and nothing is written without --record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_long_context.py"


def _load_script():
    return load_script("bench_long_context")


def _digest(path: Path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_quick_run_measures_every_case_and_records_only_when_asked(tmp_path, capsys):
    bench = _load_script()
    docs = ROOT / "docs" / "benchmarks.md"
    before = _digest(docs)
    assert bench.main(["--quick", "--lengths", "32", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert _digest(docs) == before, "a run without --record must not write docs/benchmarks.md"
    rows = [ln for ln in printed.splitlines() if ln.startswith("| ") and " | 32 | " in ln]
    names = {(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows}
    expected = {(m, s) for m in bench.ZOO_MODELS for s in ("plain", "tiled", "tiled+ckpt-blocks", "tiled+ckpt")}
    expected |= {(m, s) for m in bench.HF_MODELS for s in bench.HF_SETTINGS}
    assert names == expected
    for r in rows:  # a number in the memory and time columns, no failure
        cells = [c.strip() for c in r.strip("|").split("|")]
        float(cells[3]), float(cells[4]), float(cells[6])

    out = tmp_path / "bench.md"
    assert bench.main(["--quick", "--lengths", "32", "--device", "cpu", "--models", "mamba2", "--settings", "tiled",
                       "--record", str(out)]) == 0
    text = out.read_text()
    for key in ("- date:", "- device:", "- versions:", "- command:", "load average", "| mamba2 | tiled | 32 |"):
        assert key in text
    assert _digest(docs) == before


@pytest.mark.slow  # a fresh interpreter imports torch + transformers (tens of seconds on a loaded machine)
def test_child_subprocess_reports_peak_memory():
    bench = _load_script()
    args = bench.parse_args(["--quick", "--device", "cpu"])
    res = bench.run_child("mamba2", "tiled+ckpt", 32, args)
    assert res["peak_bytes"] > 0 and res["seconds"] > 0 and res["params"] > 0, res


def test_plot_from_recorded_tables(tmp_path):
    bench = _load_script()
    md = tmp_path / "b.md"
    md.write_text("| model | setting | L | peak MiB | KB/token | marginal KB/token | µs/token | vs plain (time) |\n"
                  "|---|---|---|---|---|---|---|---|\n| mamba2 | tiled+ckpt | 4096 | 1224 | 187.8 |  | 1342 | 1.39x |\n"
                  "| mamba2 | tiled+ckpt | 16384 | 1974 | 94.96 | 64.02 | 1234 |  |\n| mamba2 | plain | 16384 | > 8 GB |  |  |  |  |\n")
    assert len(bench.rows_from_records([md])) == 3
    assert bench.main(["--plot-records", str(md), "--plot", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 0
