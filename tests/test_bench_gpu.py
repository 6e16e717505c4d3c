"""scripts/bench_gpu.py --tiny: every Triton kernel against its reference on the CPU interpreter, as CI runs it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import load_script

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def _load_script():
    return load_script("bench_gpu")


def _table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_tiny_run_lists_every_kernel_below_tolerance(tmp_path):
    bench = _load_script()
    docs = ROOT / "docs" / "benchmarks.md"
    before = hashlib.sha256(docs.read_bytes()).hexdigest() if docs.exists() else None
    out = tmp_path / "bench.md"
    status = bench.main(["--tiny", "--record", str(out)])
    after = hashlib.sha256(docs.read_bytes()).hexdigest() if docs.exists() else None
    assert before == after, "a --record run must not touch docs/benchmarks.md"
    text = out.read_text()
    for fact in ("- date:", "- device:", "- versions:", "- command:", "load average"):
        assert fact in text, f"the recorded section lacks {fact!r}"
    rows = _table_rows(text)
    header = bench.HEADER
    seen = {(r[0], r[2]) for r in rows}
    assert seen == {(k, d) for k in bench.KERNELS for d in ("fp32", "bf16")}, seen
    for r in rows:
        row = dict(zip(header, r))
        tol = bench.TOL[row["dtype"]]
        assert float(row["err value"]) < tol and float(row["err grad"]) < tol, row
        assert row["ok"] == "yes" and float(row["triton ms"]) > 0 and float(row["torch ms"]) > 0, row
        assert row["peer"] == "-" and row["peer ms"] == "-", "no peers on the CPU interpreter"
    assert status == 0


def test_bad_dtype_is_refused_with_the_choices():
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--dtypes", "fp8"])


def test_without_cuda_a_full_run_says_how_to_run_tiny(capsys):
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.main([])
    assert "--tiny" in capsys.readouterr().err
