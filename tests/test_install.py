"""A plain (non-editable) install, used outside the checkout: the packaged configs and benchmarks work, and
`zoo --help` does not import what only one command needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import zoo
from zoo.cli import main
assert not zoo.__file__.startswith(CHECKOUT), zoo.__file__  # the installed copy, not the checkout
code = main(["train", "mamba", "--task", "mqar", "--out", "run", "model.d_model=32", "model.n_layers=1",
             "train.steps=2", "train.eval_every=0", "train.progress=false"])
assert code == 0, code
rows = [json.loads(line) for line in open("run/metrics.jsonl")]
assert rows and rows[-1]["step"] == 2, rows
assert main(["bench", "gla", "--length", "16", "--batch", "1", "--heads", "1", "--head-dim", "8", "--chunk", "16",
             "--repeats", "1"]) == 0
print("INSTALLED-OK")
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    # Build from a copy of the sources, so the checkout gets no build/ folder (whose stale files a later build
    # would package).
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "zoo", src / "zoo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, timeout=300, capture_output=True)
    assert (target / "zoo" / "configs" / "mamba.yaml").is_file() and (target / "zoo" / "configs" / "tasks" / "mqar.yaml").is_file()
    return target


def _run(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_packaged_configs_and_benchmarks_work_outside_the_checkout(installed, tmp_path):
    out = _run(f"CHECKOUT = {str(ROOT)!r}\n" + SCRIPT, installed, tmp_path)
    assert "INSTALLED-OK" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert not (tmp_path / "docs").exists()  # `zoo bench` without --record writes nothing


def test_help_does_not_import_single_command_packages(installed, tmp_path):
    code = ("import sys, contextlib, io\nfrom zoo.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('datasets', 'matplotlib', 'peft', 'lm_eval') if m in sys.modules))")
    out = _run(code, installed, tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-2000:]
