"""`zoo bench NAME` runs the packaged benchmarks; the table is printed, and appended to a file only with --record."""

from __future__ import annotations

import pytest

from zoo.cli import main


def test_bench_prints_and_records_only_when_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written next to the checkout's docs/
    args = ["bench", "gla", "--length", "32", "--batch", "1", "--heads", "1", "--head-dim", "8", "--chunk", "16",
            "--repeats", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "chunk_gla: chunked vs recurrent" in out and "| decay | path |" in out and "- command: `" in out
    assert list(tmp_path.iterdir()) == []
    rec = tmp_path / "sub" / "bench.md"
    assert main([*args, "--record", str(rec)]) == 0
    text = rec.read_text()
    assert text.startswith("# Benchmarks") and text.count("## chunk_gla") == 1 and "- versions: python" in text
    assert "zoo bench gla" in text  # the command as typed
    assert main([*args, "--record", str(rec)]) == 0
    assert rec.read_text().count("## chunk_gla") == 2  # appended, never overwritten


def test_unknown_benchmark_is_one_sentence(capsys):
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'nope'; choose one of all, delta_rule, distributed, gla, hybrid, linear_scan, mamba_cpu" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["all", "delta_rule", "distributed", "hybrid", "linear_scan", "mamba_cpu", "scaling"])
def test_every_benchmark_parses_the_shared_options(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    assert "--record FILE" in capsys.readouterr().out


def test_bench_scaling_prints_ratios_and_verdicts(capsys):
    args = ["bench", "scaling", "--lengths", "64", "128", "--repeats", "1", "--only", "linear_scan", "mingru"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| scan/linear_scan |" in out and "| mixer mingru |" in out and "wall ratio 128/64" in out
