"""Evaluation of zoo checkpoints: their zoo task and passkey retrieval (``zoo eval``), lm-evaluation-harness tasks
(the ``[eval]`` extra) and local-file perplexity.

Command line: :func:`add_lm_eval_arguments` adds ``--tasks`` / ``--perplexity`` (and their options) to a parser and
:func:`run_lm_eval_args` runs them; :func:`add_eval_parser` / :func:`run_eval` form a complete ``eval`` sub-command.
"""

from __future__ import annotations

import argparse
import json

from zoo.evaluation.harness import HAVE_LM_EVAL, EvalError, load_for_eval, run_lm_eval, write_json
from zoo.evaluation.perplexity import perplexity
from zoo.evaluation.task import evaluate_checkpoint, passkey_checkpoint


def add_lm_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The lm-eval and perplexity flags (a ``checkpoint`` positional is expected to exist already)."""
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names (needs the [eval] extra)")
    p.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (an int) or a fraction (< 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="longest token window the model is scored on")
    p.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer folder (default: the checkpoint's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--perplexity", default=None, metavar="FILE", help="local text/json/jsonl/csv/parquet file")
    p.add_argument("--text-column", default="text", help="column holding the text in --perplexity files")
    p.add_argument("--seq-len", type=int, default=1024, help="block length for --perplexity")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """A complete ``eval`` sub-command: ``eval CHECKPOINT --tasks ... | --perplexity FILE``."""
    p = subparsers.add_parser("eval", help="lm-eval tasks or perplexity on a zoo checkpoint")
    p.add_argument("checkpoint", help="checkpoint folder (zoo train / finetune output, or a LoRA adapter folder)")
    add_lm_eval_arguments(p)
    return p


def run_lm_eval_args(args: argparse.Namespace) -> int:
    """Run ``--tasks`` and/or ``--perplexity`` from parsed arguments; print the results as JSON."""
    if not args.tasks and not args.perplexity:
        print("error: nothing to evaluate; pass --tasks NAMES and/or --perplexity FILE.")
        return 2
    out: dict = {}
    try:
        if args.perplexity:
            model, tok = load_for_eval(args.checkpoint, args.tokenizer, device=args.device)
            out["perplexity"] = perplexity(model, tok, args.perplexity, seq_len=args.seq_len,
                                           batch_size=args.batch_size, text_column=args.text_column,
                                           progress=not args.no_progress)
        if args.tasks:
            limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
            out["lm_eval"] = run_lm_eval(
                args.checkpoint, args.tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                limit=limit, batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                tokenizer=args.tokenizer, progress=not args.no_progress,
            )
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    if args.output:
        write_json(args.output, {"checkpoint": args.checkpoint, **out})
    print(json.dumps(out, indent=2, default=str))
    return 0


run_eval = run_lm_eval_args


def __getattr__(name: str):
    if name == "ZooLM":  # lm-eval loads only when the adapter is used (zoo.evaluation.harness)
        from zoo.evaluation import harness

        return harness.ZooLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HAVE_LM_EVAL", "EvalError", "ZooLM", "add_eval_parser", "add_lm_eval_arguments", "evaluate_checkpoint",
    "load_for_eval", "passkey_checkpoint", "perplexity", "run_eval", "run_lm_eval", "run_lm_eval_args", "write_json",
]
