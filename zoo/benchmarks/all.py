"""Every architecture side by side: training, prefill and decode tokens/s, peak memory and state size, with peers.

Builds each registered mixer (``zoo.list_mixers()``) as a uniform stack (same width, depth, vocabulary and MLP
setting, the mixer's own defaults) and each packaged hybrid config (``zoo/configs``: every config that mixes
mixers, at the same width), then measures in one run, interleaved (every repeat times every model once, so load
on a shared machine hits all of them alike), medians after warm-up:

- training tokens/s: forward + backward of the LM loss on ``--batch x --length`` tokens;
- prefill tokens/s: batch 1, ``--length`` tokens, no grad, into a fresh cache (a forward without cache for
  bidirectional mixers, which have none);
- decode tokens/s: batch 1, greedy, after a ``--decode-prompt`` prompt, with the model's own cache loop; beside
  it the decode floor, tokens/s of the GEMVs alone (one per weight matrix per token: what batch-1 decoding must
  read, memory-bound on a CPU), and the bound it puts on the decode ratio;
- peak memory of one training step above what was allocated before it (CPU: the torch profiler's memory events
  of the CPU allocator; CUDA: ``torch.cuda.max_memory_allocated``);
- state size: floats per sequence that decoding carries at context ``--length`` (``state_size()``; a peer's is
  counted from its cache after the prefill).

Peers where one runs here (transformers' torch paths at matched sizes): ``MambaForCausalLM`` for mamba,
``Mamba2ForCausalLM`` for mamba2, ``LlamaForCausalLM`` against a Llama-shaped zoo attention + SwiGLU stack; with
the ``bench`` extra, lucidrains' ``minLM`` (minGRU) and GateLoop ``Transformer`` against zoo stacks of their shape
(a GELU MLP of 4 d per layer, untied head).
The ratio columns are zoo / peer (above 1: zoo is faster). ``--plot FILE`` also sweeps the training step over
``--plot-lengths`` and draws time vs L per architecture on log-log axes, with the fitted slope in the legend.

    zoo bench all                                       # d_model 256, 4 layers (a full run takes a while)
    zoo bench all --quick                               # short sequences, one repeat: about 2 minutes on 2 cores
    zoo bench all --only mamba mamba2 attention         # a subset (mixer or config names)
    zoo bench all --plot bench_all.png --record docs/benchmarks.md
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must not try to fetch hub kernels

import torch  # noqa: E402

import zoo  # noqa: E402
from zoo.bench import bench_parser, record, setup, sync  # noqa: E402
from zoo.config import CONFIG_DIR, read_yaml  # noqa: E402
from zoo.nn.mlp import swiglu_hidden  # noqa: E402

#: Settings --quick uses where the option was not given on the command line.
QUICK = {"batch": 1, "length": 128, "decode_prompt": 16, "decode_tokens": 8, "repeats": 1,
         "plot_lengths": [64, 128, 256]}
FULL = {"batch": 4, "length": 512, "decode_prompt": 128, "decode_tokens": 32, "repeats": 3,
        "plot_lengths": [256, 512, 1024, 2048]}
#: Other implementations that would be peers if installed (import name -> what it is); reported when absent.
OPTIONAL_PEERS = {"minGRU_pytorch": "lucidrains minGRU-pytorch", "gateloop_transformer": "lucidrains gateloop-transformer"}


@dataclasses.dataclass
class Entry:
    """One model of the table: how to build it, how to call it, and its peer (another Entry) if any."""

    name: str
    build: Callable[[], torch.nn.Module]
    layers: str = ""
    zoo: bool = True
    peer: Entry | None = None
    model: torch.nn.Module | None = None
    times: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    plot: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    peak_mib: float | None = None
    state: int | None = None
    error: str | None = None
    #: a peer fast enough to warm up and time on every repeat (transformers' Mamba is not: one step takes minutes)
    cheap: bool = False
    #: the zoo model's compiled decode step (``compile_decode()``), switched on only while it is timed
    compiled_step: Callable | None = None

    @property
    def causal(self) -> bool:
        return not self.zoo or all(b.mixer.causal for b in self.model.model.layers)


# ----- the models ---------------------------------------------------------------------------------------------
def _zoo(model_cfg: dict) -> Callable[[], torch.nn.Module]:
    return lambda: zoo.build_model({"model": model_cfg})


def _layout(model: torch.nn.Module) -> str:
    names = [b.mixer.mixer_name for b in model.model.layers]
    if len(set(names)) == 1:
        return str(len(names))
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    return f"{len(names)}: " + " + ".join(f"{c} {n}" for n, c in counts.items())


def hybrid_configs() -> list[str]:
    """Packaged configs whose stack mixes more than one mixer (samba, jamba, ...), by name."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        model = (read_yaml(path) or {}).get("model") or {}
        specs = model.get("layers") or model.get("pattern") or []
        if len({s if isinstance(s, str) else s.get("mixer") for s in specs}) > 1:
            out.append(path.stem)
    return out


def entries(args) -> list[Entry]:
    """Every registered mixer as a uniform stack, every hybrid config, and the peer-matched models (transformers, lucidrains)."""
    base = {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers, "mlp": args.mlp}
    out = [Entry(name, _zoo({**base, "pattern": [name]})) for name in zoo.list_mixers()]
    for name in hybrid_configs():
        model = dict(read_yaml(CONFIG_DIR / f"{name}.yaml")["model"])
        model.update(vocab_size=args.vocab, d_model=args.d_model)
        if "pattern" in model:  # the pattern repeats over the benchmark's depth (a config's own list is kept)
            model["n_layers"] = max(args.layers, len(model["pattern"]))
        out.append(Entry(name, _zoo(model)))
    if not args.no_peers:
        _add_peers(out, args, base)
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in out})
        if unknown:
            raise SystemExit(f"--only: no model named {unknown}; choose from {', '.join(e.name for e in out)}.")
        out = [e for e in out if e.name in args.only]
    return out


def _add_peers(out: list[Entry], args, base: dict) -> None:
    if importlib.util.find_spec("transformers") is None:
        return
    import transformers as tf

    d, n, V = args.d_model, args.layers, args.vocab
    by_name = {e.name: e for e in out}
    if args.mlp == "none" and {"mamba", "mamba2"} <= set(by_name):  # transformers' Mamba and Mamba-2 stacks have no MLP: matched by the uniform rows
        by_name["mamba"].peer = Entry("transformers MambaForCausalLM", zoo=False, build=lambda: tf.MambaForCausalLM(
            tf.MambaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=n, state_size=16, conv_kernel=4, expand=2,
                           use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True)))
        heads = 2 * d // 64  # zoo mamba2 defaults: expand 2, headdim 64, d_state 128, ngroups 1, chunk 256
        by_name["mamba2"].peer = Entry("transformers Mamba2ForCausalLM", zoo=False, cheap=True, build=lambda: tf.Mamba2ForCausalLM(
            tf.Mamba2Config(vocab_size=V, hidden_size=d, num_hidden_layers=n, num_heads=heads, head_dim=64,
                            state_size=128, expand=2, n_groups=1, conv_kernel=4, chunk_size=256, use_bias=False,
                            use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True)))
    # Llama: attention (4 heads, RoPE) + SwiGLU in every layer; the zoo model of the same shape is its own row.
    hidden = swiglu_hidden(d)  # the zoo SwiGLU's default width
    llama = Entry("attention+swiglu (Llama-shaped)", _zoo({**base, "pattern": ["attention"], "mlp": "swiglu",
                                                            "mixers": {"attention": {"n_heads": 4}}}))
    llama.peer = Entry("transformers LlamaForCausalLM", zoo=False, cheap=True, build=lambda: tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=hidden, num_hidden_layers=n,
                       num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       attention_bias=False, mlp_bias=False)))
    out.append(llama)
    _add_lucidrains(out, base)


class _IdsLM(torch.nn.Module):
    """An ids -> logits LM (lucidrains' ``minLM`` / GateLoop ``Transformer``) behind the keywords the timers pass.

    ``labels`` gives their own next-token loss; with ``use_cache`` a model that decodes (``minLM``) returns its
    per-layer hidden states as the cache, one that does not (``decodes = False``) is only timed on prefill.
    """

    def __init__(self, net: torch.nn.Module, decodes: bool) -> None:
        super().__init__()
        self.net, self.decodes = net, decodes

    def forward(self, input_ids, labels=None, use_cache=False, logits_to_keep=0, past_key_values=None):
        from types import SimpleNamespace

        if labels is not None:  # their loss predicts ids[:, 1:] from ids[:, :-1], as ours does
            return SimpleNamespace(loss=self.net(input_ids, return_loss=True), logits=None)
        if use_cache and self.decodes:
            logits, cache = self.net(input_ids, return_prev_hiddens=True, prev_hiddens=past_key_values)
        else:
            logits, cache = self.net(input_ids), None
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, past_key_values=cache)


def _add_lucidrains(out: list[Entry], base: dict) -> None:
    """lucidrains' minGRU and GateLoop LMs with the zoo rows of their shape (a GELU MLP of 4 d in every layer)."""
    d, n, V = base["d_model"], base["n_layers"], base["vocab_size"]
    gelu = {**base, "mlp": "gelu", "tie_word_embeddings": False}  # their LM heads are untied
    if importlib.util.find_spec("minGRU_pytorch") is not None:
        from minGRU_pytorch.minLM import minLM

        row = Entry("mingru+gelu (minLM-shaped)", _zoo({**gelu, "pattern": ["mingru"], "mixers": {"mingru": {"expand": 1.5}}}))
        row.peer = Entry("lucidrains minLM", zoo=False, cheap=True, build=lambda: _IdsLM(
            minLM(num_tokens=V, dim=d, depth=n, ff_mult=4, expansion=1.5), decodes=True))
        out.append(row)
    if importlib.util.find_spec("gateloop_transformer") is not None:
        from gateloop_transformer import Transformer

        row = Entry("gateloop+gelu (GateLoop-Transformer-shaped)", _zoo({**gelu, "pattern": ["gateloop"]}))
        row.peer = Entry("lucidrains GateLoop Transformer", zoo=False, cheap=True, build=lambda: _IdsLM(
            Transformer(dim=d, num_tokens=V, depth=n, ff_mult=4, use_gate_looped_attn=True,
                        checkpoint_gate_looped_attn=False), decodes=False))
        out.append(row)


# ----- what is timed --------------------------------------------------------------------------------------------
def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def train_step(model, ids) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


@torch.no_grad()
def prefill(entry: Entry, ids):
    model = entry.model.eval()
    if entry.zoo and not entry.causal:
        return model(input_ids=ids, use_cache=False, logits_to_keep=1), None
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out, _out_cache(out)


@torch.no_grad()
def decode(entry: Entry, prompt, n: int, device) -> float:
    """Seconds for ``n`` greedy steps after ``prompt`` (batch 1), each a 1-token forward with the cache."""
    out, cache = prefill(entry, prompt)
    model, key = entry.model, _cache_kw(entry.model)
    position = "cache_position" in inspect.signature(model.forward).parameters
    tok, pos = out.logits[:, -1:].argmax(-1), prompt.shape[1]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        kw = {key: cache, "use_cache": True}
        if position and not entry.zoo:
            kw["cache_position"] = torch.tensor([pos], device=device)
        out = model(input_ids=tok, **kw)
        cache = _out_cache(out) if not entry.zoo else cache
        tok, pos = out.logits[:, -1:].argmax(-1), pos + 1
    sync(device)
    return time.perf_counter() - t0


def _gemv_weights(model) -> list[torch.Tensor]:
    """The matrices a batch-1 decode step multiplies by: the weight of every ``nn.Linear`` (the head included, counted
    once when it is tied to the embedding), not other 2-D parameters such as Mamba's ``A_log``."""
    mats, seen = [], set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            mats.append(module.weight.detach())
    return mats


@torch.no_grad()
def decode_floor(model, n: int, device) -> float:
    """Seconds for ``n`` rounds of one GEMV with each of the model's weight matrices, nothing else.

    At batch 1 a decode step must read every weight once; on a CPU that is memory-bandwidth bound, so this is
    (up to cache effects) a floor for any implementation of the same model in the same precision: the column
    ``decode floor tok/s``, and ``decode x bound`` = the largest ``decode x`` any implementation could reach.
    """
    mats = _gemv_weights(model)
    vecs = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in mats]
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        for w, v in zip(mats, vecs):
            torch.nn.functional.linear(v, w)
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_train_mib(model, ids, device) -> float:
    """MiB allocated at the peak of one training step above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, ids)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals]) / 2**20  # the running total starts at 0 when the profiler starts


def cache_floats(cache) -> int:
    """Elements of every tensor a (transformers or zoo) cache holds, per sequence of a batch-1 cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for v in vars(layer).values():
            vals = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            total += sum(t.numel() for t in vals if isinstance(t, torch.Tensor) and t.is_floating_point())
    return total


def state_floats(entry: Entry, length: int, prompt) -> int | None:
    if entry.zoo:
        return sum(b.mixer.state_size(length) for b in entry.model.model.layers)
    cache = prefill(entry, prompt)[1]
    if isinstance(cache, (list, tuple)):  # lucidrains minLM: one hidden-state tensor per layer
        return sum(t[:1].numel() for t in cache)
    return None if cache is None else cache_floats(cache)


# ----- the run ---------------------------------------------------------------------------------------------------
def _resolve(args) -> None:
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _round(entry: Entry, ids, prompt, dec_prompt, args, device, *, train: bool = True) -> None:
    """One timed run of each measurement of ``entry`` (its model is built); ``train=False`` skips the training step."""
    t = entry.times
    if train:
        t.setdefault("train", []).append(timed(lambda: train_step(entry.model, ids), device))
    t.setdefault("prefill", []).append(timed(lambda: prefill(entry, prompt), device))
    if getattr(entry.model, "decodes", True) if not entry.zoo else all(b.mixer.has_step for b in entry.model.model.layers):
        t.setdefault("decode", []).append(decode(entry, dec_prompt, args.decode_tokens, device))
        if entry.zoo:
            t.setdefault("floor", []).append(decode_floor(entry.model, args.decode_tokens, device))
        if entry.compiled_step is not None:
            entry.model.__dict__["_decode_compiled"] = entry.compiled_step
            try:
                t.setdefault("decode_c", []).append(decode(entry, dec_prompt, args.decode_tokens, device))
            finally:
                entry.model.__dict__["_decode_compiled"] = None


def _compile_decode(entry: Entry, args) -> None:
    """Give a zoo model that decodes its compiled step (``compile_decode()``; not under ZOO_CPU_COMPILE=never)."""
    from zoo.kernels._compile import compile_mode

    if (not entry.zoo or not args.compile_decode or compile_mode() == "never"
            or not all(b.mixer.has_step for b in entry.model.model.layers)):
        return
    entry.model.compile_decode()
    entry.compiled_step = entry.model.__dict__["_decode_compiled"]
    entry.model.__dict__["_decode_compiled"] = None


def run(args) -> list[Entry]:
    device, dtype = setup(args)
    torch.manual_seed(0)
    todo = entries(args)
    every = [x for e in todo for x in (e, e.peer) if x is not None]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen).to(device)
    prompt = torch.randint(0, args.vocab, (1, args.length), generator=gen).to(device)
    dec_prompt = prompt[:, : args.decode_prompt]
    for e in every:  # build and warm up every model first
        try:
            e.model = e.build().to(device=device, dtype=dtype)
            _compile_decode(e, args)  # (compiled during the warm-up's decode)
            for _ in range(args.warmup):  # (transformers' Mamba's training step is not warmed up: it takes minutes)
                _round(e, ids, prompt, dec_prompt, args, device, train=e.zoo or e.cheap)
            e.times.clear()
        except Exception as err:  # one model that cannot run here must not take the table down
            e.error, e.model = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}", None
            print(f"{e.name}: skipped ({e.error})", flush=True)
    live = [e for e in every if e.model is not None]
    for r in range(args.repeats):  # interleaved: each repeat times every model once
        for e in live:
            _round(e, ids, prompt, dec_prompt, args, device, train=e.zoo or e.cheap or r < args.peer_train_repeats)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    for e in live:
        e.peak_mib = peak_train_mib(e.model, ids, device) if e.zoo else None  # (the table shows zoo's)
        e.state = state_floats(e, args.length, prompt)
        e.layers = _layout(e.model) if e.zoo else str(args.layers)
    if args.plot:
        for L in args.plot_lengths:
            x = torch.randint(0, args.vocab, (args.plot_batch, L), generator=gen).to(device)
            swept = [e for e in live if e.zoo or args.plot_peers]
            for e in swept:
                train_step(e.model, x)  # warm-up at this length
            for _ in range(args.repeats):
                for e in swept:
                    e.plot.setdefault(L, []).append(timed(functools.partial(train_step, e.model, x), device))
            print(f"plot: L={L} done", flush=True)
    return todo


def _tok_s(entry: Entry | None, key: str, tokens: int) -> float | None:
    if entry is None or not entry.times.get(key):
        return None
    return tokens / statistics.median(entry.times[key])


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def table(todo: list[Entry], args) -> tuple[list[str], list[list]]:
    header = ["model", "layers", "params", "train tok/s", "prefill tok/s", "decode tok/s", "peak train MiB",
              "state floats/seq", "peer", "peer train tok/s", "train x", "peer prefill tok/s", "prefill x",
              "peer decode tok/s", "decode x", "decode floor tok/s", "decode x bound", "compiled decode tok/s",
              "compiled decode x"]
    ntrain, nprefill, ndec = args.batch * args.length, args.length, args.decode_tokens
    fmt = lambda v: "-" if v is None else round(v, 1) if v < 100 else round(v)  # noqa: E731
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"  # noqa: E731
    rows = []
    for e in todo:
        if e.model is None:
            rows.append([e.name, "-", "-", f"not run: {e.error}", *["-"] * (len(header) - 4)])
            continue
        floor = _tok_s(e, "floor", ndec)
        ours = [_tok_s(e, k, n) for k, n in (("train", ntrain), ("prefill", nprefill), ("decode", ndec))]
        row = [e.name, e.layers, _params(e.model), *map(fmt, ours), fmt(e.peak_mib), e.state]
        p = e.peer if e.peer is not None and e.peer.model is not None else None
        compiled = _tok_s(e, "decode_c", ndec)
        if p is None:
            row += ["-" if e.peer is None else f"not run: {e.peer.error}", *["-"] * 6, fmt(floor), "-", fmt(compiled),
                    "-"]
        else:
            theirs = [_tok_s(p, k, n) for k, n in (("train", ntrain), ("prefill", nprefill), ("decode", ndec))]
            row += [f"{p.name} ({_params(p.model)}, state {p.state})"]
            for a, b in zip(ours, theirs):
                row += [fmt(b), ratio(a, b)]
            row += [fmt(floor), ratio(floor, theirs[2]), fmt(compiled), ratio(compiled, theirs[2])]
        rows.append(row)
    return header, rows


def plot(todo: list[Entry], path: Path, args) -> None:
    """Training-step time vs L per model on log-log axes; the legend gives each line's fitted slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for i, e in enumerate([x for t in todo for x in (t, t.peer) if x is not None and x.plot]):
        Ls = sorted(e.plot)
        ts = [statistics.median(e.plot[L]) for L in Ls]
        slope = _slope(Ls, ts)
        ax.plot(Ls, ts, marker="o", color=plt.cm.tab20(i % 20), linestyle="-" if e.zoo else "--", label=f"{e.name} (slope {slope:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel(f"forward + backward time per step (s), batch {args.plot_batch}")
    ax.set_title(f"Training step time vs L: d_model {args.d_model}, {args.layers} layers (log-log; slope 1 = linear)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (1: time linear in L, 2: quadratic)."""
    if len(xs) < 2:
        return float("nan")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> list[list]:
    ap = bench_parser(__doc__, repeats=None)
    ap.add_argument("--quick", action="store_true",
                    help="short sequences and one repeat (about 2 minutes on 2 CPU cores); explicit options still win")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="depth of the uniform stacks and of the repeated hybrid patterns")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--mlp", default="none", help="the uniform stacks' MLP: none (default; as Mamba LMs), swiglu, gelu")
    ap.add_argument("--batch", type=int, default=None, help=f"training batch (default {FULL['batch']}, quick {QUICK['batch']})")
    ap.add_argument("--length", type=int, default=None,
                    help=f"training and prefill length (default {FULL['length']}, quick {QUICK['length']})")
    ap.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens before the timed decode steps")
    ap.add_argument("--decode-tokens", type=int, default=None, help="greedy decode steps timed per repeat")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of everything before the timed repeats")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these models (mixer or config names)")
    ap.add_argument("--no-peers", action="store_true", help="skip the transformers peers")
    ap.add_argument("--no-compile-decode", dest="compile_decode", action="store_false",
                    help="skip the compiled-decode column (compile_decode(); also skipped under ZOO_CPU_COMPILE=never)")
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE", help="also sweep --plot-lengths and write a PNG")
    ap.add_argument("--plot-lengths", type=int, nargs="+", default=None)
    ap.add_argument("--plot-batch", type=int, default=1)
    ap.add_argument("--plot-peers", action="store_true", help="also sweep the peers (transformers' Mamba is slow at long L)")
    ap.add_argument("--peer-train-repeats", type=int, default=1,
                    help="timed training steps of each peer (default 1, no warm-up: transformers' Mamba takes minutes)")
    args = ap.parse_args(argv)
    _resolve(args)
    if args.decode_prompt > args.length:
        raise SystemExit(f"--decode-prompt {args.decode_prompt} exceeds --length {args.length}; pass a shorter prompt.")
    todo = run(args)
    header, rows = table(todo, args)
    missing = [desc for mod, desc in OPTIONAL_PEERS.items() if importlib.util.find_spec(mod) is None]
    device = torch.device(args.device)
    dtype = str(setup(args)[1]).removeprefix("torch.")
    record(
        "All architectures: training, prefill, decode, memory and state, with peers",
        header, rows, device=device, path=args.record,
        notes=(
            f"d_model {args.d_model}, {args.layers} layers (hybrids: their config's pattern repeated to that depth, jamba "
            f"its own 8 layers), vocab {args.vocab}, MLP {args.mlp} in the uniform stacks (hybrids: their config's), "
            f"each mixer's default settings, {dtype} weights and inputs; training = forward + backward of the LM loss "
            f"on {args.batch} x {args.length} tokens; prefill = batch 1, {args.length} tokens into a fresh cache (no "
            f"cache for bidirectional mixers); decode = batch 1, {args.decode_tokens} greedy steps after a "
            f"{args.decode_prompt}-token prompt, own cache loop; medians of {args.repeats} interleaved repeats after "
            f"{args.warmup} warm-up; peak train MiB = peak allocation of one training step above what was allocated "
            + ("before it (torch.cuda.max_memory_allocated)" if device.type == "cuda" else
               "before it, from the torch profiler's CPU allocator memory events")
            + f"; transformers' MambaForCausalLM training: {min(args.peer_train_repeats, args.repeats)} timed step(s) "
            "without warm-up (its sequential torch path takes minutes a step; every other peer is warmed up and timed "
            "like zoo)"
            + f"; state floats/seq = what decoding carries at context {args.length} (zoo: state_size(); peers: their "
            "cache after the prefill); x = zoo / peer (above 1: zoo faster). Peers: transformers' torch paths and "
            "lucidrains' LMs (their GELU MLP of 4 d per layer, matched by the '+gelu' zoo rows; GateLoop's has no "
            "cache, so no decode), fresh weights, at matched sizes"
            + (f"; not installed here, so not compared: {', '.join(missing)}" if missing else "")
            + "; decode floor = the GEMVs alone, one per weight matrix per token (what batch-1 decoding must read; "
            "memory-bound on a CPU), decode x bound = floor / peer decode, the eager GEMVs' bound (the compiled "
            "step's prepacked weights can pass it); compiled decode = the same loop after the zoo model's "
            "compile_decode() (one torch.compile'd graph per step, frozen weights; the peers decode eagerly, their "
            "default), compiled decode x = that / peer decode"
            + ("; flash-linear-attention: no row on CPU (its models and ops run Triton kernels, which need a GPU "
               "driver; scripts/bench_gpu.py compares the kernels with FLA on CUDA)" if device.type == "cpu" else
               "; flash-linear-attention: kernels compared in scripts/bench_gpu.py, not here")
            + (f"; plot of training-step time vs L: {args.plot}" if args.plot else "") + "."
        ),
    )
    if args.plot:
        plot(todo, args.plot, args)
    return rows


if __name__ == "__main__":
    main()
