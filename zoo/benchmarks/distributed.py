"""Tokens/s per process of `zoo train` on 1 vs 2 CPU processes (gloo, DDP), for one model.

    OMP_NUM_THREADS=1 zoo bench distributed [--config hgrn] [--steps 20] [--record docs/benchmarks.md]

Each run is launched with torchrun-style environment variables (the ranks are plain subprocesses);
the time per step comes from the `tokens_per_s` column of rank 0's metrics.jsonl (first step dropped).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from zoo.bench import bench_parser, record

JOB = """
import json, sys
import zoo
from zoo.train import train
train(zoo.load_config(sys.argv[1], overrides=json.loads(sys.argv[2])), sys.argv[3])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args, tmp: Path) -> float:
    out = tmp / f"w{world}"
    overrides = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.log_every=1",
                 "train.eval_every=0", "task.num_test=0", f"task.num_train={args.batch_size * args.steps}",
                 f"task.seq_len={args.seq_len}", "train.progress=false", "train.device=cpu", "train.num_threads=1",
                 "train.warmup_steps=1"] + args.override
    script = tmp / "job.py"
    script.write_text(JOB)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        if world == 1:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        procs.append(subprocess.Popen([sys.executable, str(script), args.config, json.dumps(overrides), str(out)],
                                      env=env, stdout=subprocess.DEVNULL))
    if any(p.wait(timeout=args.timeout) for p in procs):
        sys.exit(f"the {world}-process run failed")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return sum(rates) / len(rates) / world  # global tokens/s over the processes


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, threads=None, repeats=1, steps=20, batch_size=16, seq_len=256, timeout=600.0)
    p.add_argument("--config", default="hgrn", help="a config path or packaged name (default hgrn)")
    p.add_argument("override", nargs="*", help="extra key.path=value overrides")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("zoo bench distributed measures CPU processes on gloo; run it with --device cpu (the default).")
    with tempfile.TemporaryDirectory() as tmp:
        results = {w: run(w, args, Path(tmp)) for w in (1, 2)}
    notes = (f"config {args.config}, global batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps "
             "(the first dropped), one torch thread per process; tokens/s from rank 0's metrics.jsonl.")
    record("Data-parallel zoo train on CPU: 1 vs 2 processes (gloo, DDP)",
           ["processes", "tokens/s per process", "tokens/s total", "scaling vs 1 process"],
           [[w, round(per), round(per * w), per * w / results[1]] for w, per in results.items()], args=args, notes=notes)


if __name__ == "__main__":
    main()
