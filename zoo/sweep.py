"""The MQAR recall sweep (Zoology's protocol): architectures x widths x (L, pairs), best over learning rates.

A sweep YAML has a ``sweep:`` section (what to vary) and ``model:`` / ``train:`` / ``task:`` sections shared by
every run (the same schema as ``zoo train``). Each run trains ``n_layers`` layers of one mixer through
``zoo.train.loop.train`` and scores Zoology's accuracy on held-out MQAR data. Results go to ``<name>.csv``
(every run; ``best`` marks the best learning rate of each cell) and two plots: accuracy against width per
setting (``<name>-width.png``) and accuracy against recurrent state size (``<name>-state.png``; the sum of
``state_size(seq_len)`` over layers, so attention counts its KV cache at the sequence length).

Finished runs are kept in the CSV; running the same sweep again skips them (``--restart`` starts over).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

COLUMNS = [
    "mixer", "d_model", "seq_len", "num_kv_pairs", "lr", "accuracy", "eval_loss", "state_size", "params",
    "steps", "seconds", "best", "config_hash",
]


class SweepError(ValueError):
    """A sweep-config problem, stated in one sentence naming the key and the fix."""


@dataclass
class SweepConfig:
    """The ``sweep:`` section: what varies across runs."""

    name: str = "mqar"
    mixers: list[str] | str = "all"  # registry names, or "all" for every registered causal mixer
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    settings: list[list[int]] = field(default_factory=lambda: [[64, 4], [128, 8], [256, 16], [512, 64]])  # (L, kv)
    lrs: list[float] = field(default_factory=lambda: [1e-4, 4.6e-4, 2.2e-3, 1e-2])  # logspace(-4, -2, 4)
    n_layers: int = 2
    out: str = "docs/sweeps"
    # model.mixers overrides per width: {width: {mixer: {kwarg: value}}} (e.g. heads that must divide the width)
    width_overrides: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Sweep:
    """A parsed sweep: its settings and the base ``model`` / ``train`` / ``task`` sections."""

    sweep: SweepConfig
    base: dict
    source: str

    def runs(self) -> list[dict]:
        """One dict per run: ``mixer, d_model, seq_len, num_kv_pairs, lr`` and the full run config."""
        out = []
        for mixer in self.mixer_names():
            for width in self.sweep.widths:
                for seq_len, kv in self.sweep.settings:
                    for lr in self.sweep.lrs:
                        out.append({"mixer": mixer, "d_model": width, "seq_len": seq_len, "num_kv_pairs": kv,
                                    "lr": lr, "config": self.run_config(mixer, width, seq_len, kv, lr)})
        return out

    def mixer_names(self) -> list[str]:
        """The mixers of the sweep (``all``: every registered causal mixer)."""
        import zoo

        if self.sweep.mixers == "all":
            return [m for m in zoo.list_mixers() if zoo.get_mixer(m).causal]
        if isinstance(self.sweep.mixers, str):
            raise SweepError(f"sweep.mixers: {self.sweep.mixers!r} must be a list of mixer names or 'all'.")
        known = zoo.list_mixers()
        for m in self.sweep.mixers:
            if m not in known:
                raise SweepError(f"sweep.mixers: unknown mixer {m!r}; choose from {', '.join(known)} (or 'all').")
        return list(self.sweep.mixers)

    def run_config(self, mixer: str, width: int, seq_len: int, kv: int, lr: float) -> dict:
        """The full ``zoo train`` config of one run."""
        from zoo.config import deep_merge

        mixers = deep_merge(self.base.get("model", {}).get("mixers") or {}, self.sweep.width_overrides.get(width, {}))
        model = {"d_model": width, "n_layers": self.sweep.n_layers, "pattern": [mixer],
                 "mixers": {mixer: mixers.get(mixer, {})}}
        task = {"name": "mqar", "seq_len": seq_len, "num_kv_pairs": kv}
        run = deep_merge(self.base, {"model": model, "train": {"lr": lr}, "task": task})
        run["model"]["mixers"] = model["mixers"]  # only this run's mixer: settings for an unused mixer are refused
        return run


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep YAML (``key.path=value`` overrides applied first)."""
    from zoo.config import ConfigError, apply_overrides, read_yaml, validate_dataclass

    raw = apply_overrides(read_yaml(path), overrides)
    for key in raw:
        if key not in ("sweep", "model", "train", "task"):
            raise SweepError(f"{key}: unknown section in {path}; allowed: sweep, model, train, task.")
    try:
        cfg = validate_dataclass(SweepConfig, raw.get("sweep"), "sweep")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    for i, s in enumerate(cfg.settings):
        if len(s) != 2:
            raise SweepError(f"sweep.settings[{i}]: {s!r} must be a pair [seq_len, num_kv_pairs], e.g. [64, 4].")
    for name in ("widths", "settings", "lrs"):
        if not getattr(cfg, name):
            raise SweepError(f"sweep.{name}: empty; give at least one value.")
    if any(not (lr > 0) for lr in cfg.lrs):
        raise SweepError(f"sweep.lrs: learning rates must be positive, got {cfg.lrs}.")
    cfg.width_overrides = {int(k): v for k, v in (cfg.width_overrides or {}).items()}
    base = {k: v for k, v in raw.items() if k != "sweep"}
    return Sweep(sweep=cfg, base=base, source=str(path))


def config_hash(config: dict) -> str:
    """A short stable hash of a run config (rows computed under another config are not reused)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_state_size(model: torch.nn.Module, seq_len: int) -> int:
    """Recurrent state (floats per sequence) summed over layers; attention counts its KV cache at ``seq_len``."""
    return int(sum(block.mixer.state_size(seq_len) for block in model.model.layers))


# ----- running -----------------------------------------------------------------------------------------

def _key(row: dict) -> tuple:
    return (row["mixer"], int(row["d_model"]), int(row["seq_len"]), int(row["num_kv_pairs"]), float(row["lr"]))


def read_rows(path: Path) -> list[dict]:
    """The rows of a sweep CSV (numbers converted back), or [] when it does not exist."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k in ("d_model", "seq_len", "num_kv_pairs", "state_size", "params", "steps", "best"):
                r[k] = int(r[k])
            for k in ("lr", "accuracy", "eval_loss", "seconds"):
                r[k] = float(r[k])
            rows.append(r)
    return rows


def mark_best(rows: list[dict]) -> list[dict]:
    """Set ``best = 1`` on the highest-accuracy learning rate of each (mixer, width, setting) cell."""
    best: dict[tuple, dict] = {}
    for r in rows:
        r["best"] = 0
        cell = _key(r)[:4]
        if cell not in best or r["accuracy"] > best[cell]["accuracy"]:
            best[cell] = r
    for r in best.values():
        r["best"] = 1
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write the CSV atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in sorted(rows, key=_key):
            w.writerow({k: r[k] for k in COLUMNS})
    os.replace(tmp, path)


def run_one(run: dict) -> dict:
    """Train one run and return its CSV row."""
    import zoo
    from zoo.train.loop import train

    cfg = zoo.load_config(run["config"])
    model = zoo.build_model(cfg)
    state = model_state_size(model, run["seq_len"])
    params = sum(p.numel() for p in model.parameters())
    del model
    tmp = Path(tempfile.mkdtemp(prefix="zoo-sweep-"))
    t0 = time.perf_counter()
    try:
        result = train(cfg, tmp / "run", overwrite=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    acc = result.eval_accuracy if result.eval_accuracy is not None else float("nan")
    return {
        "mixer": run["mixer"], "d_model": run["d_model"], "seq_len": run["seq_len"],
        "num_kv_pairs": run["num_kv_pairs"], "lr": run["lr"], "accuracy": float(acc),
        "eval_loss": float(result.eval_loss if result.eval_loss is not None else float("nan")),
        "state_size": state, "params": params, "steps": result.step, "seconds": round(time.perf_counter() - t0, 2),
        "best": 0, "config_hash": config_hash(run["config"]),
    }


def run_sweep_config(sweep: Sweep, out: str | Path | None = None, *, restart: bool = False,
                     progress: bool = True, plots_only: bool = False) -> dict[str, Path]:
    """Run every missing run of ``sweep``, then write the CSV, both plots and a report; returns their paths.

    ``plots_only``: train nothing; redraw from the finished runs already in the CSV.
    """
    import zoo

    out = Path(out or sweep.sweep.out)
    csv_path = out / f"{sweep.sweep.name}.csv"
    runs = sweep.runs()
    for run in runs:  # validate every run before training any (a bad width fails now, not after an hour)
        try:
            zoo.load_config(run["config"])
        except zoo.ConfigError as e:
            raise SweepError(
                f"run {run['mixer']} d_model={run['d_model']}: {e} (set sweep.width_overrides.{run['d_model']}."
                f"{run['mixer']} to fix it for this width)"
            ) from None
    wanted = {_key(r): config_hash(r["config"]) for r in runs}
    existing = [] if restart else read_rows(csv_path)
    rows = [r for r in existing if wanted.get(_key(r)) == r["config_hash"]]
    others = [r for r in existing if _key(r) not in wanted]  # other runs in the same CSV are kept, not plotted
    done = {_key(r) for r in rows}
    todo = [] if plots_only else [r for r in runs if _key(r) not in done]
    if not rows and not todo:
        raise SweepError(f"{csv_path} holds no finished run of this sweep; run it without --plots-only first.")
    bar = tqdm(todo, desc=f"sweep {sweep.sweep.name}", disable=not progress, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(f"{run['mixer']} d={run['d_model']} L={run['seq_len']} kv={run['num_kv_pairs']} lr={run['lr']:.1e}")
        row = run_one(run)
        rows.append(row)
        write_rows(csv_path, mark_best(rows + others))
        bar.write(f"{row['mixer']:>10} d={row['d_model']:<4} L={row['seq_len']:<4} kv={row['num_kv_pairs']:<3} "
                  f"lr={row['lr']:.1e}  acc={row['accuracy']:.3f}  ({row['seconds']:.0f}s)")
    write_rows(csv_path, mark_best(rows + others))
    rows = mark_best([dict(r) for r in rows])  # best over this sweep's learning rates only
    paths = {"csv": csv_path, "width_png": out / f"{sweep.sweep.name}-width.png",
             "state_png": out / f"{sweep.sweep.name}-state.png"}
    plot_width(rows, paths["width_png"], title=sweep.sweep.name)
    plot_state(rows, paths["state_png"], title=sweep.sweep.name)
    paths["report"] = out / f"{sweep.sweep.name}.md"
    write_report(rows, paths, sweep)
    return paths


def write_report(rows: list[dict], paths: dict[str, Path], sweep: Sweep) -> None:
    """A markdown page beside the CSV: the best-accuracy table, the plots, and how and where it was run."""
    import platform
    import sys

    total = sum(r["seconds"] for r in rows)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cmd = " ".join(["zoo sweep", *sys.argv[1:]]) if Path(sys.argv[0]).stem in ("zoo", "sweep", "__main__") else (
        f"zoo sweep {sweep.source}")
    lines = [
        f"# MQAR sweep `{sweep.sweep.name}`", "",
        f"Generated by `zoo sweep` from `{sweep.source}`. Accuracy is Zoology's (mean over query positions, then "
        "examples) on held-out data, best over the learning rates "
        f"{', '.join(f'{lr:g}' for lr in sweep.sweep.lrs)}; state size is the sum over layers of `state_size()` "
        "(attention: its KV cache at the sequence length).", "",
        "```", summary(rows), "```", "",
        f"![accuracy vs width]({paths['width_png'].name})", "",
        f"![accuracy vs state size]({paths['state_png'].name})", "",
        f"Runs: {len(rows)}, training time summed over runs: {total / 60:.1f} min. "
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU only")
        + (f"; load average at the end {load[0]:.1f} (shared machine)" if load else "") + ".", "",
        f"Command: `{cmd}`. All runs: [{paths['csv'].name}]({paths['csv'].name}).", "",
    ]
    tmp = paths["report"].with_name(f".{paths['report'].name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, paths["report"])


# ----- plots ---------------------------------------------------------------------------------------------

def _best_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["best"]]


def _settings(rows: list[dict]) -> list[tuple[int, int]]:
    return sorted({(r["seq_len"], r["num_kv_pairs"]) for r in rows})


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def _panels(rows: list[dict], xkey: str, xlabel: str, path: Path, title: str, logx: bool) -> None:
    from matplotlib.figure import Figure

    best = _best_rows(rows)
    settings = _settings(best)
    n = max(len(settings), 1)
    fig = Figure(figsize=(4.2 * n, 3.6))
    mixers = sorted({r["mixer"] for r in best})
    for i, (L, kv) in enumerate(settings):
        ax = fig.add_subplot(1, n, i + 1)
        for m in mixers:
            pts = sorted((r[xkey], r["accuracy"]) for r in best if r["mixer"] == m and (r["seq_len"], r["num_kv_pairs"]) == (L, kv))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if xkey == "d_model":  # widths are powers of two: label each one
            widths = sorted({r["d_model"] for r in best})
            ax.set_xscale("log", base=2)
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
        elif logx:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"L={L}, kv pairs={kv}")
        ax.set_xlabel(xlabel)
        if i == 0:
            ax.set_ylabel("MQAR accuracy (best lr)")
        ax.grid(alpha=0.3)
    if mixers:
        fig.axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, y=1.04)
    _save_figure(fig, path)


def plot_width(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy (best over learning rates) against model width, one panel per (L, kv) setting."""
    _panels(rows, "d_model", "model width d_model", Path(path), f"{title}: accuracy vs width", logx=True)


def plot_state(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy (best over learning rates) against recurrent state size (floats, log scale), per setting."""
    _panels(rows, "state_size", "state size (floats per sequence, all layers)", Path(path),
            f"{title}: accuracy vs state size", logx=True)


def summary(rows: list[dict]) -> str:
    """A plain-text table: best accuracy per mixer, width and setting."""
    best = _best_rows(mark_best(rows))
    settings = _settings(best)
    head = f"{'mixer':>12} {'d_model':>7} " + " ".join(f"{f'L{L}/kv{kv}':>11}" for L, kv in settings)
    lines = [head]
    for m, w in sorted({(r["mixer"], r["d_model"]) for r in best}):
        cells = []
        for s in settings:
            hit = [r["accuracy"] for r in best if (r["mixer"], r["d_model"], r["seq_len"], r["num_kv_pairs"]) == (m, w, *s)]
            cells.append(f"{hit[0]:>11.3f}" if hit and not math.isnan(hit[0]) else f"{'-':>11}")
        lines.append(f"{m:>12} {w:>7} " + " ".join(cells))
    return "\n".join(lines)


# ----- command line --------------------------------------------------------------------------------------

def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sweep`` sub-command to an argparse ``subparsers`` object and return its parser."""
    return subparsers.add_parser("sweep", parents=[sweep_argument_parser()], help="run the MQAR recall sweep (CSV + plots)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def sweep_argument_parser() -> argparse.ArgumentParser:
    """The flags of ``zoo sweep``, as a parser to pass in ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("config", help="sweep YAML, e.g. configs/sweeps/mqar-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. sweep.widths=[32,64] train.steps=200")
    p.add_argument("--out", default=None, help="output folder (default: sweep.out of the YAML)")
    p.add_argument("--restart", action="store_true", help="ignore finished runs in the CSV and run everything again")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--plots-only", action="store_true", help="train nothing: redraw the plots and report from the CSV")
    return p


def run_sweep(args: argparse.Namespace) -> int:
    """Entry point of ``zoo sweep``: run, then print the summary table and where the files are."""
    import zoo

    try:
        sweep = load_sweep(args.config, args.overrides)
        paths = run_sweep_config(sweep, args.out, restart=args.restart, progress=not args.no_progress,
                                 plots_only=args.plots_only)
    except (SweepError, zoo.ConfigError) as e:
        print(f"error: {e}")
        return 2
    print(summary(read_rows(paths["csv"])))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.sweep CONFIG ...``: ``zoo sweep`` with the same arguments."""
    import sys

    from zoo.cli import main as zoo_main

    return zoo_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "COLUMNS", "Sweep", "SweepConfig", "SweepError", "add_sweep_parser", "config_hash", "load_sweep",
    "mark_best", "model_state_size", "plot_state", "plot_width", "read_rows", "run_sweep", "run_sweep_config",
    "summary", "write_rows",
]
