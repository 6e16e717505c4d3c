"""CPU benchmark: a zoo Mamba LM against transformers' MambaForCausalLM (its torch path), forward + backward.

Both models have the same config (4 layers, width 256, batch 2, d_state 16, no MLP) and the same weights
(copied from the zoo model by name). Prints a table of median seconds per forward+backward.

    zoo bench mamba_cpu                                 # L = 256 512 1024 4096; transformers at 256 512
    zoo bench mamba_cpu --record docs/benchmarks.md     # also append the table there
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must not try to fetch hub kernels

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

import zoo  # noqa: E402
from zoo.bench import bench_parser, record, setup  # noqa: E402


def zoo_model(args) -> torch.nn.Module:
    cfg = {"model": {"vocab_size": args.vocab, "d_model": args.width, "n_layers": args.layers, "pattern": ["mamba"],
                     "mixers": {"mamba": {"d_state": 16, "d_conv": 4, "expand": 2}}, "mlp": "none"}}
    return zoo.build_model(cfg)


def hf_model(args, src: torch.nn.Module) -> torch.nn.Module:
    """transformers' Mamba with the zoo model's weights (names mapped one to one)."""
    cfg = MambaConfig(vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers, state_size=16,
                      conv_kernel=4, expand=2, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True)
    hf = MambaForCausalLM(cfg)
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("model.embed.", "backbone.embeddings.").replace("model.norm_f.", "backbone.norm_f.")
        k = k.replace("model.layers.", "backbone.layers.").replace(".mixer_norm.", ".norm.")
        sd[k] = v
    hf.load_state_dict(sd, strict=True)
    return hf


def fwd_bwd(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - t


def median_time(model, L: int, args, repeats: int) -> float:
    ids = torch.randint(0, args.vocab, (args.batch, L), generator=torch.Generator().manual_seed(L))
    return statistics.median(fwd_bwd(model, ids) for _ in range(repeats))


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, threads=2, lengths=[256, 512, 1024, 4096], layers=4, width=256, batch=2, vocab=1024)
    p.add_argument("--hf-lengths", type=int, nargs="*", default=[256, 512])
    p.add_argument("--hf-repeats", type=int, default=1, help="timed repeats of transformers' model (it is slow)")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("zoo bench mamba_cpu measures the CPU paths; run it with --device cpu (the default).")
    setup(args)
    torch.manual_seed(0)
    ours = zoo_model(args).train()
    theirs = hf_model(args, ours).train()

    ids = torch.randint(0, args.vocab, (args.batch, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # same weights -> same logits; also warms both models up
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    logit_err = ((a - b).norm() / b.norm()).item()
    fwd_bwd(ours, ids)
    fwd_bwd(theirs, ids)

    rows = []
    for L in sorted(set(args.lengths) | set(args.hf_lengths)):
        t_zoo = median_time(ours, L, args, args.repeats) if L in args.lengths else None
        t_hf = median_time(theirs, L, args, args.hf_repeats) if L in args.hf_lengths else None
        print(f"L={L}: zoo {t_zoo} s, transformers {t_hf} s", flush=True)
        rows.append([L, "-" if t_zoo is None else round(t_zoo, 2), "-" if t_hf is None else round(t_hf, 2),
                     "-" if t_zoo is None or t_hf is None else f"{t_hf / t_zoo:.1f}x"])
    record(
        "Mamba-1 LM forward+backward on CPU: zoo vs transformers",
        ["L", "zoo Mamba fwd+bwd (s)", "transformers Mamba fwd+bwd (s)", "speed-up"],
        rows,
        args=args,
        notes=(f"{args.layers} layers, width {args.width}, batch {args.batch}, d_state 16, d_conv 4, expand 2, "
               f"vocab {args.vocab}, no MLP, float32; transformers {transformers.__version__} MambaForCausalLM on its "
               f"torch path with the same weights (logits rel. err {logit_err:.1e}); median of {args.repeats} (zoo) / "
               f"{args.hf_repeats} (transformers) forward+backward runs after warm-up."),
    )


if __name__ == "__main__":
    main()
