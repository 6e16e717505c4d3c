"""Sequence parallelism on CPU (gloo): per-rank peak memory, step time and bytes communicated per layer vs L and P.

For each model and sequence length L, P = 1, 2, 4 gloo processes on this machine split one sequence (batch 1)
into P slices (``zoo.parallel.sequence``) and run training steps (forward + backward with labels). Reported per
case: the slowest rank's median step time, the largest per-rank peak memory (peak RSS ``ru_maxrss`` minus the RSS
just before the first step, each case in fresh processes), and per layer what the last rank received from the
forward's collectives (``sequence.count_communication``), next to the formula; every rank's counts are checked
against its own formula (the ``counts = formula`` column):

* LASP-2 states (Mamba's selective scan): ``P · B · H·K·V`` per layer per direction (here ``d_inner · d_state``),
  independent of L, and as many transitions gathered with them (``lasp_transition``: each slice's total decay).
* short-conv / sliding-window halos: ``B · min(W - 1, L/P) · width`` on every rank but rank 0 (a point-to-point
  exchange: each rank receives the tail of the previous rank's slice; K and V for attention); a window longer than
  a slice falls back to an all-gather, ``B · L · width``.
* Ulysses attention: ``4 · B · L · D / P`` per layer (q, k, v and o through all-to-all; less with GQA).
* all-gather attention: ``2 · B · L · Hkv · head_dim`` (every slice's K and V).

The backward's collectives mirror the forward's (an all-reduce of each gather, the opposite all-to-all) and are
not counted. P = 1 runs the plain model in one process (no collectives).

    python scripts/bench_sequence_parallel.py                            # mamba, samba, mamba+ulysses; L up to 64K
    python scripts/bench_sequence_parallel.py --quick                    # tiny smoke run (seconds)
    python scripts/bench_sequence_parallel.py --record /tmp/sp_bench.md  # append the table to a file

Nothing is written anywhere unless ``--record FILE`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("mamba", "samba", "mamba-ulysses")


def model_config(name: str, *, d_model: int, n_layers: int, vocab: int, window: int) -> dict:
    """The model section for ``name``: pure Mamba, Samba-like (Mamba + sliding-window attention), Mamba + full
    attention through Ulysses."""
    heads = max(d_model // 64, 4)
    mamba = {"d_state": 16, "expand": 2, "d_conv": 4}
    layouts = {
        "mamba": (["mamba"], {"mamba": mamba}, "none"),
        "samba": (["mamba", "attention"], {"mamba": mamba, "attention": {"n_heads": heads, "window": window}}, "swiglu"),
        "mamba-ulysses": (["mamba", "attention"], {"mamba": mamba, "attention": {"n_heads": heads, "sp": "ulysses"}},
                          "swiglu"),
    }
    pattern, mixers, mlp = layouts[name]
    return {"vocab_size": vocab, "d_model": d_model, "n_layers": n_layers, "pattern": pattern, "mixers": mixers,
            "mlp": mlp, "tie_word_embeddings": False}


def halo(W: int, L: int, P: int, rank: int, width: int, B: int = 1) -> int:
    """Elements ``rank`` receives for a halo of the ``W - 1`` tokens before its slice over ``width`` channels."""
    n = L // P
    if W - 1 > n:  # reaches back over whole slices: all-gathered
        return B * L * width
    return B * (W - 1) * width if rank > 0 else 0  # point-to-point from the previous rank; rank 0 has none


def formulas(mixer, L: int, P: int, rank: int, B: int = 1) -> dict[str, int]:
    """Elements ``rank`` receives per forward collective kind for one layer (see the module docstring)."""
    name = type(mixer).__name__.lower()
    n = L // P
    if P == 1:
        return {}
    if name == "mamba":
        out = {"lasp_state": P * B * mixer.d_inner * mixer.d_state,
               "lasp_transition": P * B * mixer.d_inner * mixer.d_state,
               "halo": halo(mixer.d_conv, L, P, rank, mixer.d_inner, B)}
        return {k: v for k, v in out.items() if v}
    if name == "attention":
        hd, H, Hkv = mixer.head_dim, mixer.n_heads, mixer.n_kv_heads
        if mixer.window is not None:
            return {"halo": h} if (h := halo(mixer.window, L, P, rank, 2 * Hkv * hd, B)) else {}
        if mixer.sp == "ulysses":
            return {"all_to_all": B * n * hd * (2 * H + 2 * Hkv)}  # = 4 · L · D / P without GQA
        return {"kv": 2 * B * L * Hkv * hd}
    return {}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> None:
    """One rank of one case: steps, timings, peak memory and the per-layer communication counts."""
    import torch
    import torch.distributed as dist

    import zoo
    from zoo.parallel import sequence as sp

    torch.set_num_threads(1)
    P, L = spec["world"], spec["L"]
    if P > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if P > 1 else 0
    torch.manual_seed(0)
    net = zoo.build_model(spec["model"]).float().train()
    ids = torch.randint(0, net.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    shard = sp.SequenceShard(None, rank, P, L) if P > 1 else None
    local = shard.take(ids) if shard is not None else ids

    layers = list(net.model.layers)
    per_layer: list[dict[str, list[int]]] = [{} for _ in layers]
    counting: dict = {"counts": None, "before": {}}  # the counter of the counted step, and a snapshot per layer

    def pre(i):
        def hook(module, args):
            if counting["counts"] is not None:
                counting["before"][i] = {k: list(v) for k, v in counting["counts"].items()}
        return hook

    def post(i):
        def hook(module, args, out):
            if counting["counts"] is not None:
                before = counting["before"][i]
                per_layer[i] = {k: [a - b for a, b in zip(v, before.get(k, [0, 0, 0]))]
                                for k, v in counting["counts"].items() if v != before.get(k)}
        return hook

    hooks = [h for i, b in enumerate(layers)
             for h in (b.mixer.register_forward_pre_hook(pre(i)), b.mixer.register_forward_hook(post(i)))]

    def step(count: bool):
        with sp.sequence_parallel(shard), sp.count_communication() as counts:
            counting["counts"] = counts if count else None
            out = net(input_ids=local, labels=local)
            counting["counts"] = None
        out.loss.backward()
        net.zero_grad(set_to_none=True)

    base = _rss_bytes()
    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        t0 = time.perf_counter()
        step(count=i == 0)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    for h in hooks:
        h.remove()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    mine = {"time": statistics.median(times), "peak": peak, "layers": per_layer}
    every = [None] * P
    if P > 1:
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    if rank == 0:
        exact = all({k: v[0] for k, v in r["layers"][i].items()} == formulas(b.mixer, L, P, q)
                    for q, r in enumerate(every) for i, b in enumerate(layers)
                    if type(b.mixer).__name__.lower() in ("mamba", "attention"))
        result = {"time": max(r["time"] for r in every), "peak": max(r["peak"] for r in every), "exact": exact,
                  "layers": [{"mixer": type(b.mixer).__name__, "measured": every[-1]["layers"][i],
                              "formula": formulas(b.mixer, L, P, P - 1)} for i, b in enumerate(layers)]}
        Path(spec["out"]).write_text(json.dumps(result))
    if P > 1:
        dist.destroy_process_group()


def run_case(model: dict, L: int, P: int, args) -> dict:
    """Launch P fresh processes for one case (the environment torchrun sets) and return rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"model": model, "L": L, "world": P, "warmup": args.warmup, "repeats": args.repeats,
                "out": str(Path(tmp) / "result.json")}
        procs = []
        for rank in range(P):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P), LOCAL_WORLD_SIZE=str(P),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env))
        codes = [p.wait(timeout=args.timeout) for p in procs]
        if any(codes):
            raise RuntimeError(f"a rank of {P} failed at L={L} (exit codes {codes}); see its output above.")
        return json.loads(Path(spec["out"]).read_text())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--world", nargs="+", type=int, default=[1, 2, 4], help="group sizes P")
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512, help="samba's sliding attention window")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per case before its ranks are given up")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every path (seconds)")
    ap.add_argument("--record", type=Path, default=None, help="append the table, device, versions, date, command here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.d_model, args.layers, args.vocab, args.window = [256], 64, 2, 256, 32
        args.warmup, args.repeats = 0, 1
    return args


def _comm_cell(layer: dict) -> str:
    """``kind measured/formula`` for every kind a layer moved or should move (elements; formula '-' if none)."""
    kinds = sorted(set(layer["measured"]) | set(layer["formula"]))
    return ", ".join(f"{k} {layer['measured'].get(k, [0])[0]}/{layer['formula'].get(k, '-')}" for k in kinds) or "none"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    header = ["model", "P", "L", "step s (slowest rank)", "peak MiB per rank", "bytes received per layer (fwd, last rank)",
              "elements received per layer (last rank): measured/formula", "counts = formula (every rank)"]
    rows = []
    for name in args.models:
        model = model_config(name, d_model=args.d_model, n_layers=args.layers, vocab=args.vocab, window=args.window)
        for L in args.lengths:
            for P in args.world:
                if L % P:
                    continue
                res = run_case(model, L, P, args)
                by_mixer: dict[str, dict] = {}
                for layer in res["layers"]:  # layers of one mixer move the same amounts: show the first of each
                    by_mixer.setdefault(layer["mixer"], layer)
                comm = "; ".join(f"{m}: {_comm_cell(layer)}" for m, layer in by_mixer.items())
                nbytes = "; ".join(f"{m}: {sum(v[1] for v in layer['measured'].values())}" for m, layer in by_mixer.items())
                exact = "-" if P == 1 else ("yes" if res["exact"] else "NO")
                rows.append([name, P, L, round(res["time"], 4), round(res["peak"] / 2**20, 1), nbytes, comm, exact])
                print("  " + " | ".join(map(str, rows[-1])), flush=True)
    from zoo.bench import markdown_table, record

    notes = (f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, B=1, fp32, gloo on loopback, one "
             f"thread per rank; median of {args.repeats} step(s) after {args.warmup} warm-up; peak RSS (ru_maxrss) "
             f"minus RSS before the first step, fresh processes per case; communication counted in the forward "
             f"(zoo.parallel.sequence.count_communication); 1-min load average {os.getloadavg()[0]:.1f}")
    title = "Sequence parallelism on CPU (scripts/bench_sequence_parallel.py)"
    if args.record is not None:
        record(title, header, rows, device="cpu", notes=notes, path=args.record)
    else:
        print(f"## {title}\n\n- {notes}\n\n{markdown_table(header, rows)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
