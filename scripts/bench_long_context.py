"""Peak memory per token and time per token of one training step (forward + backward with labels) vs L.

Zoo models (mamba, mamba2, retnet, samba) with and without the long-sequence settings, side by side with
transformers' Mamba-2 and Llama of the same size (built from configs, random weights, nothing downloaded).
Each (model, setting, L) runs in its own subprocess, so its peak memory is its own: on CPU the child's peak
RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS just before the step; on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step. A case whose memory passes
``--max-gb`` (or that runs out of memory) is marked and its larger L are skipped; the longest L that trained
is listed per case.

    python scripts/bench_long_context.py                          # L = 4K .. 256K, all cases
    python scripts/bench_long_context.py --lengths 4096 32768 --models mamba2 hf-mamba2
    python scripts/bench_long_context.py --record docs/benchmarks.md   # also append the table there
    python scripts/bench_long_context.py --quick                  # tiny smoke run (in-process, seconds)
    python scripts/bench_long_context.py --plot mem.png           # also a log-log plot of memory per token vs L
    python scripts/bench_long_context.py --plot-records docs/benchmarks.md --plot mem.png  # plot recorded tables

Nothing is written anywhere unless ``--record FILE`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO_MODELS = ("mamba", "mamba2", "retnet", "samba")
HF_MODELS = ("hf-mamba2", "hf-llama")
#: setting name -> (loss_chunk_size, mlp_chunk_size, activation checkpointing, CPU offload, checkpoint_chunk_size)
ZOO_SETTINGS = {
    "plain": (0, 0, False, False, 0),
    "tiled": (1024, 4096, False, False, 0),
    "tiled+ckpt-blocks": (1024, 4096, True, False, 0),  # checkpointing recomputes whole blocks
    "tiled+ckpt": (1024, 4096, True, False, 4096),  # ... recurrent blocks in sequence tiles of 4096 tokens
    "tiled+ckpt+offload": (1024, 4096, True, True, 4096),  # CUDA only
}
HF_SETTINGS = ("plain", "ckpt")
DEFAULT_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072, 262144]


def build(name: str, setting: str, *, d_model: int, n_layers: int, vocab: int, max_len: int):
    """The model of ``name`` under ``setting``, in training mode."""
    if name in HF_MODELS:
        import transformers

        if name == "hf-mamba2":
            cfg = transformers.Mamba2Config(
                vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, state_size=128, expand=2,
                head_dim=64, num_heads=2 * d_model // 64, n_groups=1, chunk_size=256, tie_word_embeddings=True,
            )
            model = transformers.Mamba2ForCausalLM(cfg)
        else:
            cfg = transformers.LlamaConfig(
                vocab_size=vocab, hidden_size=d_model, intermediate_size=_swiglu_hidden(d_model),
                num_hidden_layers=n_layers, num_attention_heads=max(d_model // 64, 1),
                num_key_value_heads=max(d_model // 64, 1), max_position_embeddings=max_len,
                tie_word_embeddings=True,
            )
            model = transformers.LlamaForCausalLM(cfg)
        if setting == "ckpt" and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif setting == "ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    from zoo.models import ZooConfig, ZooForCausalLM

    loss_chunk, mlp_chunk, ckpt, offload, ckpt_chunk = ZOO_SETTINGS[setting]
    heads = max(d_model // 64, 1)
    layouts = {
        "mamba": (["mamba"], {"mamba": {"d_state": 16, "expand": 2}}, "none"),
        "mamba2": (["mamba2"], {"mamba2": {"d_state": 128, "headdim": 64, "expand": 2, "chunk_size": 256}}, "none"),
        "retnet": (["retnet"], {"retnet": {"n_heads": heads, "mode": "chunk", "chunk_size": 64}}, "swiglu"),
        "samba": (["mamba", "attention"], {"mamba": {"d_state": 16, "expand": 2},
                                           "attention": {"n_heads": heads, "window": 2048}}, "swiglu"),
    }
    pattern, mixers, mlp = layouts[name]
    cfg = ZooConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, pattern=pattern, mixers=mixers, mlp=mlp,
                    loss_chunk_size=loss_chunk, mlp_chunk_size=mlp_chunk, checkpoint_chunk_size=ckpt_chunk)
    model = ZooForCausalLM(cfg).train()
    if ckpt:
        model.gradient_checkpointing_enable(offload=offload)
    return model


def _swiglu_hidden(d_model: int) -> int:
    from zoo.nn.mlp import swiglu_hidden

    return swiglu_hidden(d_model)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, setting: str, L: int, args) -> dict:
    """One case in this process: peak extra memory of a training step and its median time."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(name, setting, d_model=args.d_model, n_layers=args.layers, vocab=args.vocab, max_len=L).to(device)
    ids = torch.randint(0, args.vocab, (1, L), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.dtype == "bf16"
                else torch.autocast(device.type, enabled=False))

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated, as in training

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(args.warmup + args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    sec = statistics.median(times[args.warmup:])
    return {"peak_bytes": peak, "step_bytes": max(peak - base, 0), "seconds": sec,
            "params": sum(p.numel() for p in model.parameters())}


def run_child(name: str, setting: str, L: int, args) -> dict:
    """``measure`` in a fresh subprocess, killed when its RSS passes ``--max-gb`` or it runs past ``--timeout``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, setting, str(L),
           "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    limit = args.max_gb * 2**30
    start = time.monotonic()
    status = None
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = 0
        if args.device == "cpu" and rss > limit:
            status = f"> {args.max_gb:g} GB"
        elif time.monotonic() - start > args.timeout:
            status = f"> {args.timeout:g} s"
        if status:
            proc.kill()
            proc.wait()
            return {"status": status}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["killed"])[-1]
        return {"status": "OOM" if "out of memory" in last.lower() or proc.returncode < 0 else f"error: {last[:80]}"}
    return json.loads(out.strip().splitlines()[-1])


def cases(args) -> list[tuple[str, str]]:
    out = []
    for name in args.models:
        settings = HF_SETTINGS if name in HF_MODELS else [
            s for s in ZOO_SETTINGS if not (s.endswith("offload") and args.device == "cpu")
        ]
        out += [(name, s) for s in settings if not args.settings or s in args.settings]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 4K..256K)")
    ap.add_argument("--models", nargs="+", default=[*ZOO_MODELS, *HF_MODELS], choices=[*ZOO_MODELS, *HF_MODELS])
    ap.add_argument("--settings", nargs="+", default=None, help="only these settings (e.g. plain tiled+ckpt ckpt)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 autocast on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=20.0, help="a CPU case whose RSS passes this is stopped")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    ap.add_argument("--record", type=Path, default=None, help="append the table, device, versions, date, command here")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: d_model 32, 2 layers, vocab 512, L 64 128")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of memory per token vs L (log-log)")
    ap.add_argument("--plot-records", type=Path, nargs="+", default=None, metavar="MD",
                    help="only plot: read the tables a previous --record wrote into these files (no measuring)")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SETTING", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.quick:
        args.d_model, args.layers, args.vocab = min(args.d_model, 32), min(args.layers, 2), min(args.vocab, 512)
        args.lengths = args.lengths or [64, 128]
        args.repeats, args.warmup = 1, 0
    args.lengths = args.lengths or DEFAULT_LENGTHS
    return args


def plot(rows: list[list], path: Path) -> None:
    """Peak step memory per token (KB) vs L, log-log, one line per (model, setting) that trained at two L or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        pts = [(int(r[2]), float(r[4])) for r in rows if (r[0], r[1]) == key and _number(r[4])]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=f"{key[0]} {key[1]}")
    ax.axhline(64, color="grey", ls="--", lw=0.8, label="64 KB/token")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel="peak step memory per token (KB)",
           title="One training step, B = 1 (scripts/bench_long_context.py)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def _number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def rows_from_records(paths: list[Path]) -> list[list]:
    """The result rows of the tables --record wrote (``| model | setting | L | ...`` lines)."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 8 and cells[2].isdigit():
                rows.append(cells)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_records:
        plot(rows_from_records(args.plot_records), args.plot or Path("long-context-memory.png"))
        return 0
    if args.child:
        name, setting, L = args.child
        print(json.dumps(measure(name, setting, int(L), args)))
        return 0
    import torch

    if args.quick:
        torch.set_num_threads(1)
    # KB/token: the step's extra memory over L (includes fixed costs: weight gradients, one loss tile);
    # marginal KB/token: its growth from the previous L over the added tokens, i.e. what each token costs.
    header = ["model", "setting", "L", "peak MiB", "KB/token", "marginal KB/token", "µs/token", "vs plain (time)"]
    rows, longest = [], {}
    for name, setting in cases(args):
        failed, prev = False, None
        for L in sorted(args.lengths):
            if failed:
                rows.append([name, setting, L, "skipped", "", "", "", ""])
                continue
            res = measure(name, setting, L, args) if args.quick else run_child(name, setting, L, args)
            if "status" in res:
                failed = True
                rows.append([name, setting, L, res["status"], "", "", "", ""])
                print(f"  {name} | {setting} | {L} | {res['status']}", flush=True)
                continue
            longest[(name, setting)] = L
            us = res["seconds"] / L * 1e6
            marginal = "" if prev is None else round((res["step_bytes"] - prev[1]) / (L - prev[0]) / 1e3, 2)
            prev = (L, res["step_bytes"])
            rows.append([name, setting, L, round(res["peak_bytes"] / 2**20, 1), round(res["step_bytes"] / L / 1e3, 2),
                         marginal, round(us, 2), ""])
            print("  " + " | ".join(map(str, rows[-1][:7])), flush=True)  # each case as it finishes (a long sweep)
    for row in rows:  # time relative to the same model's plain setting at the same L
        ref = next((r[6] for r in rows if r[0] == row[0] and r[1] == "plain" and r[2] == row[2]), None)
        if isinstance(ref, float) and isinstance(row[6], float) and ref > 0:
            row[7] = f"{row[6] / ref:.2f}x"
    from zoo.bench import markdown_table, record

    summary = [[n, s, longest.get((n, s), "none")] for n, s in cases(args)]
    how = ("in-process (--quick: memory not isolated per case)" if args.quick else
           "one subprocess per case; CPU: peak RSS (ru_maxrss) minus RSS before the step; "
           "CUDA: max_memory_allocated minus allocated before the step")
    notes = (f"d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, B=1, {args.dtype}, "
             f"median of {args.repeats} step(s) after {args.warmup} warm-up; {how}; cases stop at {args.max_gb:g} GB; "
             f"1-min load average {os.getloadavg()[0]:.1f}")
    title = "Long-context training memory (scripts/bench_long_context.py)"
    if args.record is not None:
        record(title, header, rows, device=args.device, notes=notes, path=args.record)
        with args.record.open("a") as f:
            f.write("\nLongest trained L in this sweep:\n\n" + markdown_table(["model", "setting", "longest L"], summary) + "\n")
    else:
        print(f"## {title}\n\n- {notes}\n\n{markdown_table(header, rows)}\n")
    print("Longest trained L in this sweep:\n\n" + markdown_table(["model", "setting", "longest L"], summary))
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
