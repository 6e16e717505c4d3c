"""The ``zoo`` command line: ``zoo list | train | eval | generate`` (and any command added with :func:`command`).

A subcommand is one function decorated with ``@command(name, help, arg(...), ...)``; it receives the parsed
``argparse.Namespace`` (plus ``overrides``: the ``key.path=value`` words) and returns an exit code. Problems
with the user's input (configs, checkpoints, files) print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Command:
    """A registered subcommand: its name, help line, argparse arguments and the function that runs it."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    args: list[tuple[tuple, dict]] = field(default_factory=list)
    overrides: bool = False  # accepts trailing key.path=value words


COMMANDS: dict[str, Command] = {}

#: Subcommands whose flags live in their own module, imported only when that command runs: name -> (module,
#: function returning a parser of the command's flags (used as a parent), function running the parsed args, help line).
EXTERNAL: dict[str, tuple[str, str, str, str]] = {
    "finetune": ("zoo.finetune", "finetune_argument_parser", "run_finetune",
                 "fine-tune a zoo model with transformers' Trainer (optionally LoRA)"),
    "sweep": ("zoo.sweep", "sweep_argument_parser", "run_sweep", "run the MQAR recall sweep (CSV + plots)"),
}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple, dict]:
    """One ``parser.add_argument(*flags, **kwargs)`` call, for :func:`command`."""
    return flags, kwargs


def command(name: str, help: str, *args: tuple[tuple, dict], overrides: bool = False):
    """Register the decorated function as ``zoo <name>``."""

    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name=name, help=help, run=fn, args=list(args), overrides=overrides)
        return fn

    return deco


class UsageError(ValueError):
    """A command-line mistake, printed as one ``error:`` line."""


def _split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key.path=value`` words from config paths (an existing file named with '=' stays a path)."""
    paths, overrides = [], []
    for w in words:
        (overrides if "=" in w and not os.path.exists(w) else paths).append(w)
    return paths, overrides


# ----- zoo list --------------------------------------------------------------------------------------

@command("list", "list the registered mixers (causal? one-token step path? what it is)")
def cmd_list(args: argparse.Namespace) -> int:
    """Print one line per registered mixer."""
    import zoo

    names = zoo.list_mixers()
    width = max([len(n) for n in names] + [5])
    print(f"{'mixer':<{width}}  causal  step  description")
    for name in names:
        cls = zoo.get_mixer(name)
        doc = (cls.__doc__ or "").replace("``", "").strip().splitlines()
        yes = {True: "yes", False: "no"}
        causal = yes.get(getattr(cls, "causal", True), "?")
        step = yes.get(getattr(cls, "has_step", True), "?")
        print(f"{name:<{width}}  {causal:<6}  {step:<4}  {doc[0] if doc else ''}")
    return 0


# ----- zoo train -------------------------------------------------------------------------------------

@command(
    "train",
    "train a model: zoo train CONFIG [CONFIG ...] --out DIR [--resume] [key.path=value ...]",
    arg("configs", nargs="*", metavar="CONFIG", help="YAML files (or configs/ names) deep-merged in order"),
    arg("--task", action="append", default=[], metavar="TASK_YAML", help="task YAML merged after the configs"),
    arg("--out", required=True, help="run directory: metrics.jsonl, curves.png, checkpoint-<step>/, final/"),
    arg("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
        help="continue the run in --out from its latest checkpoint (or from CHECKPOINT)"),
    arg("--overwrite", action="store_true", help="replace a finished or partial run already in --out"),
    overrides=True,
)
def cmd_train(args: argparse.Namespace) -> int:
    """Train, then print the final accuracy, the checkpoint path and how to load it."""
    import zoo
    from zoo.config import task_path
    from zoo.train import train
    from zoo.train.checkpoint import latest_checkpoint, load_run_config, resolve_checkpoint
    from zoo.train.distributed import is_main

    if not is_main():  # under torchrun / accelerate launch only rank 0 prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - kept open for the life of the process
    sources: list[Any] = list(args.configs) + [task_path(t) for t in args.task]
    if not args.configs:
        if not args.resume:
            raise UsageError("zoo train needs a CONFIG YAML (e.g. configs/attention.yaml), or --resume with --out.")
        ckpt = latest_checkpoint(args.out) if args.resume is True else resolve_checkpoint(args.resume)
        saved = load_run_config(ckpt) if ckpt is not None else None
        if saved is None:
            raise UsageError(f"--resume: {args.out} holds no checkpoint with zoo_run.yaml; pass the CONFIG again.")
        sources.insert(0, saved)
    run = zoo.load_config(sources, args.overrides)
    model_desc = "+".join(dict.fromkeys(run.model.mixer_names))
    print(f"training {model_desc} ({run.model.n_layers} layers, d_model {run.model.d_model}) on task "
          f"{run.task.name} for {run.train.steps} steps -> {args.out}", flush=True)
    t0 = time.perf_counter()
    try:
        result = train(run, args.out, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with the same command plus --resume (from the latest checkpoint in {args.out}).",
              file=sys.stderr)
        return 130
    minutes = (time.perf_counter() - t0) / 60
    path = Path(result.checkpoint).resolve() if result.checkpoint else None
    acc = f"{result.eval_accuracy:.4f}" if result.eval_accuracy is not None else "n/a"
    loss = f"{result.eval_loss:.4f}" if result.eval_loss is not None else "n/a"
    print(f"final eval accuracy {acc} (eval loss {loss}) after {result.step} steps in {minutes:.1f} min")
    print(f"metrics: {Path(args.out) / 'metrics.jsonl'}   curves: {Path(args.out) / 'curves.png'}")
    if path is not None:
        print(f"checkpoint: {path}")
        print("load it with:")
        print("    import zoo; from transformers import AutoModelForCausalLM")
        print(f'    model = AutoModelForCausalLM.from_pretrained("{path}")')
    return 0


# ----- zoo eval --------------------------------------------------------------------------------------

@command(
    "eval",
    "task loss and accuracy of a zoo checkpoint: zoo eval CHECKPOINT [--task TASK_YAML] [key.path=value ...]",
    arg("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint is used)"),
    arg("--task", action="append", default=[], metavar="TASK_YAML", help="evaluate on this task instead"),
    arg("--json", action="store_true", help="print the result as one JSON object"),
    arg("--passkey", metavar="LENGTHS", help="passkey retrieval accuracy at these prompt lengths, e.g. 1024,4096,32768"),
    arg("--passkey-n", type=int, default=5, help="passkey examples per length (depths spread over the prompt)"),
    arg("--prefill-chunk", type=int, default=2048, help="feed long prompts through the cache in chunks of this size"),
    overrides=True,
)
def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on its own task (from zoo_run.yaml) or on the task given (``zoo.evaluation``).

    With ``--tasks`` / ``--perplexity`` it runs lm-eval tasks or local-file perplexity instead.
    """
    if getattr(args, "tasks", None) or getattr(args, "perplexity", None):
        from zoo.evaluation import run_lm_eval_args

        return run_lm_eval_args(args)
    if args.passkey:
        from zoo.evaluation import passkey_checkpoint

        try:
            lengths = [int(x) for x in args.passkey.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--passkey {args.passkey!r}: expected lengths such as 1024,4096,32768.") from None
        for row in passkey_checkpoint(args.checkpoint, lengths, n_per_length=args.passkey_n,
                                      prefill_chunk_size=args.prefill_chunk):
            print(json.dumps(row) if args.json
                  else f"passkey L={row['length']:>6}: accuracy {row['accuracy']:.2f} ({row['n']} prompts)")
        return 0
    from zoo.evaluation import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.task, args.overrides)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['checkpoint']}: task {res['task']}  eval loss {res['loss']:.4f}  accuracy {res['accuracy']:.4f}  "
              f"({res['examples']} examples)")
    return 0


# ----- zoo bench -------------------------------------------------------------------------------------

def _benchmarks() -> list[str]:
    """The packaged benchmarks (files of zoo/benchmarks/), listed without importing them or torch."""
    return sorted(p.stem for p in (Path(__file__).resolve().parent / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


@command(
    "bench",
    "run a packaged benchmark and print its table: zoo bench NAME [--record FILE] [options]",
    arg("name", help=f"one of {', '.join(_benchmarks())} (zoo/benchmarks/NAME.py); `zoo bench NAME --help` lists its options"),
    arg("script_args", nargs=argparse.REMAINDER, help="options passed to the benchmark, e.g. --record docs/benchmarks.md"),
)
def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``zoo.benchmarks.<name>.main`` with the given arguments (it appends its table only with --record FILE)."""
    import importlib

    names = _benchmarks()
    if args.name not in names:
        raise UsageError(f"no benchmark {args.name!r}; choose one of {', '.join(names)}.")
    saved, sys.argv = sys.argv, ["zoo", "bench", args.name, *args.script_args]  # the command the record shows
    try:
        importlib.import_module(f"zoo.benchmarks.{args.name}").main(list(args.script_args))
    finally:
        sys.argv = saved
    return 0


# ----- zoo generate ----------------------------------------------------------------------------------

@command(
    "generate",
    "continue a prompt with a zoo checkpoint: zoo generate CHECKPOINT --prompt TEXT [--max-new-tokens N]",
    arg("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint is used)"),
    arg("--prompt", help="text prompt (tokenised with the checkpoint's tokenizer, else the byte tokenizer)"),
    arg("--ids", help="prompt as token ids, e.g. '12 7 300' (for synthetic-task models); prints ids"),
    arg("--tokenizer", help="'byte' or a local tokenizer folder (default: the checkpoint's, else byte)"),
    arg("--max-new-tokens", type=int, default=32),
    arg("--do-sample", action="store_true", help="sample instead of greedy decoding"),
    arg("--temperature", type=float, default=1.0),
    arg("--top-k", type=int, default=None),
    arg("--top-p", type=float, default=None),
    arg("--num-beams", type=int, default=1),
    arg("--seed", type=int, default=0),
    arg("--compile", action="store_true",
        help="run each decode step compiled (model.compile_decode()): seconds of compiling first, then faster "
             "tokens; pays for long generations"),
)
def cmd_generate(args: argparse.Namespace) -> int:
    """Generate a continuation and print it."""
    import torch

    from zoo.loading import find_checkpoint, load_model, load_model_and_tokenizer

    if (args.prompt is None) == (args.ids is None):
        raise UsageError("zoo generate needs exactly one of --prompt TEXT or --ids '1 2 3'.")
    ckpt = find_checkpoint(args.checkpoint)
    if args.ids is not None:
        model, tok = load_model(ckpt, causal_lm=True), None
    else:
        model, tok = load_model_and_tokenizer(ckpt, args.tokenizer, causal_lm=True)
    model.eval()
    vocab = model.config.vocab_size
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--ids {args.ids!r}: expected integers separated by spaces, e.g. '12 7 300'.") from None
        if not ids or max(ids) >= vocab or min(ids) < 0:
            raise UsageError(f"--ids must be non-empty token ids in [0, {vocab}) for {ckpt}.")
    else:
        if len(tok) > vocab:
            who = f"tokenizer {args.tokenizer!r}" if args.tokenizer else "the checkpoint's tokenizer"
            raise UsageError(
                f"{who} has {len(tok)} tokens but {ckpt} has model.vocab_size={vocab}; "
                "pass --tokenizer for the one it was trained with, or --ids for a synthetic-task model."
            )
        ids = tok(args.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UsageError("--prompt is empty; give some text to continue.")
    torch.manual_seed(args.seed)
    input_ids = torch.tensor([ids])
    gen_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                                  "num_beams": args.num_beams}
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (
        tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
    if args.compile:
        model.compile_decode()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad, **gen_kwargs)
    new = out[0, input_ids.shape[1]:].tolist()
    if tok is None:
        print(" ".join(str(i) for i in ids + new))
    else:
        print(args.prompt + tok.decode(new, skip_special_tokens=True))
    return 0


# ----- zoo convert -----------------------------------------------------------------------------------

@command(
    "convert",
    "convert a Hugging Face or mamba_ssm Mamba / Mamba-2 checkpoint: zoo convert SRC --out DIR",
    arg("src", help="source checkpoint directory (config.json + safetensors or pytorch_model.bin)"),
    arg("--out", required=True, help="where to write the zoo checkpoint"),
)
def cmd_convert(args: argparse.Namespace) -> int:
    """Convert, then print how to load the result."""
    from zoo.convert import convert_checkpoint

    out = Path(convert_checkpoint(args.src, args.out)).resolve()
    print(f"converted {args.src} -> {out}")
    print("load it with:")
    print("    import zoo; from transformers import AutoModelForCausalLM")
    print(f'    model = AutoModelForCausalLM.from_pretrained("{out}")')
    return 0


# ----- entry point -----------------------------------------------------------------------------------

def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The ``zoo`` parser with one subparser per command; ``selected`` also gets its module-provided flags."""
    parser = argparse.ArgumentParser(prog="zoo", description="seq-zoo: efficient sequence architectures.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        if cmd.name == "eval" and selected == "eval":
            _add_lm_eval_arguments(p)
    for name, (module, flags, run, help) in EXTERNAL.items():
        if name in COMMANDS:
            continue
        if name != selected:
            sub.add_parser(name, help=help, description=help)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help, description=help, parents=[getattr(mod, flags)()])
        p.set_defaults(_external=getattr(mod, run))
    return parser


def _add_lm_eval_arguments(p: argparse.ArgumentParser) -> None:
    """``zoo eval`` also runs lm-eval tasks / local perplexity (``--tasks``, ``--perplexity``) when installed."""
    try:
        from zoo.evaluation import add_lm_eval_arguments
    except ImportError:
        return
    add_lm_eval_arguments(p)


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zoo`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_external", None) is not None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return _guarded(args._external, args)
    cmd = COMMANDS[args.command]
    args.overrides = []
    if cmd.overrides:
        if hasattr(args, "configs"):
            args.configs, args.overrides = _split_overrides(args.configs)
        resume = getattr(args, "resume", None)
        if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
            args.overrides.append(resume)  # `--resume key=value`: the word after a bare --resume is an override
            args.resume = True
        words, more = _split_overrides(extra)
        args.overrides += more
        extra = [w for w in words if w.startswith("-")]
        if hasattr(args, "configs"):  # config paths given after an option
            args.configs += [w for w in words if not w.startswith("-")]
        else:
            extra = words
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return _guarded(cmd.run, args)


def _guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a problem with the user's input becomes one ``error:`` line and exit status 2."""
    try:
        return run(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # ConfigError, CheckpointError, UsageError, ...
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
