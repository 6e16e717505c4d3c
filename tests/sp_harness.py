"""Run jobs on P gloo processes on loopback (the sequence-parallel tests' launcher) and collect their results.

``run_ranks([("sp_jobs_core:scan_job", {...}), ...], world=2, tmp=tmp_path)`` starts ``world`` processes of this file
with the environment torchrun sets; each joins one gloo group, runs every job (a function ``fn(**kwargs) -> dict of
tensors`` in a module of the tests folder) in order and saves its results; the call returns, per job, the list of
every rank's result dict. One launch runs many jobs, so torch is imported once per rank. A hang or a crash on any
rank fails the test with the ranks' logs, within ``timeout`` seconds.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(jobs: list[tuple[str, dict]], *, world: int, tmp: Path, timeout: float = 180) -> list[list[dict]]:
    """Run ``jobs`` on ``world`` ranks; returns ``results[job][rank]`` (each a dict of tensors / numbers)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    port = _free_port()
    root = HERE.parent
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(root), str(HERE), os.environ.get("PYTHONPATH", "")]))
        log = open(tmp / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__)), str(spec), str(tmp)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = "\n".join(f"--- rank {r} (exit {procs[r].returncode}) ---\n{(tmp / f'rank{r}.log').read_text()[-4000:]}"
                         for r in range(world))
        raise AssertionError(f"ranks {failed} failed or timed out after {timeout:.0f} s:\n{text}")
    return [[torch.load(tmp / f"job{j}.rank{r}.pt") for r in range(world)] for j in range(len(jobs))]


def _worker(spec: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for j, (target, kwargs) in enumerate(json.loads(Path(spec).read_text())):
            module, fn = target.split(":")
            result = getattr(importlib.import_module(module), fn)(**kwargs)
            torch.save(result, Path(out) / f"job{j}.rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def model_mismatches(res: dict, where: str, *, layers: int, length: int) -> list[str]:
    """What differs between one rank's ``sp_jobs_model.model_job`` result and its one-process references.

    Every mixer must have seen ``length`` tokens (``layers`` of them). fp32: relative 1e-5, and 1e-5 of the
    tensor's largest entry for entries near zero (sums of many terms, e.g. the embedding's gradient, round at that
    level whatever the order of summation).
    """
    seen = res["seen"]
    if seen.numel() != layers or not bool((seen == length).all()):
        return [f"{where}: mixers saw {seen.tolist()}, expected {layers} x {length}"]
    out = []
    for key in res:
        if key.endswith("_ref") or key == "seen":
            continue
        ref = res[key + "_ref"]
        atol = max(1e-6, 1e-5 * float(ref.abs().max())) if ref.numel() else 1e-6
        try:
            torch.testing.assert_close(res[key], ref, rtol=1e-5, atol=atol)
        except AssertionError as err:
            out.append(f"{where} {key}: {str(err).splitlines()[-1]}")
    return out


def assert_models_exact(models: dict[str, tuple[dict, int]], packings: list, *, world: int, tmp: Path, length: int) -> None:
    """Every model (name -> (model config, number of layers)) at every packing, split over ``world`` ranks, equals
    one process (``sp_jobs_model.model_job``, one launch for all): a list of every mismatch on failure."""
    jobs = [("sp_jobs_model:model_job", {"model": cfg, "L": length, "cu": cu, "seed": i})
            for i, (cfg, _) in enumerate(models.values()) for cu in packings]
    names = [name for name in models for _ in packings]
    failures = []
    for name, (_job, kw), per_rank in zip(names, jobs, run_ranks(jobs, world=world, tmp=tmp, timeout=300)):
        for rank, res in enumerate(per_rank):
            failures += model_mismatches(res, f"{name} cu={kw['cu']} rank {rank}/{world}", layers=models[name][1],
                                         length=length // world)
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:40])
