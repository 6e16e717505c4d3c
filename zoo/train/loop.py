"""The training loop behind ``zoo train``: AdamW + warmup/cosine, clipping, accumulation, periodic eval,
``metrics.jsonl``, ``curves.png`` and exactly resumable checkpoints."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zoo.data import build_task
from zoo.data.base import IGNORE_INDEX, TokenDataset
from zoo.data.tokenizer import load_tokenizer
from zoo.models.loss import tiled_linear_cross_entropy
from zoo.parallel import sequence
from zoo.train import distributed as zdist
from zoo.train.checkpoint import (
    FINAL,
    CheckpointError,
    dict_diff,
    latest_checkpoint,
    list_checkpoints,
    load_run_config,
    load_trainer_state,
    model_config_diff,
    quiet_hf_progress,
    remove_stale_temp_dirs,
    resolve_checkpoint,
    rng_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from zoo.train.config import RESUME_SAFE_KEYS
from zoo.train.metrics import per_example_accuracy, plot_curves, shifted_targets, write_jsonl
from zoo.train.optim import build_optimizer, build_scheduler

METRICS = "metrics.jsonl"
CURVES = "curves.png"


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    checkpoint: Path | None  # the last checkpoint written
    step: int
    eval_loss: float | None
    eval_accuracy: float | None
    history: list[dict] = field(default_factory=list)


class EpochSampler:
    """Batches of indices from a fresh seeded permutation each epoch; its position is two ints (exact resume)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise ValueError(
                f"the training set has {n} examples, fewer than train.batch_size={batch_size}; "
                "raise task.num_train or lower train.batch_size."
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=gen)

    def next(self) -> torch.Tensor:
        """Indices of the next batch (the tail of an epoch that cannot fill a batch is skipped)."""
        if self.offset + self.batch_size > self.n:
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = self._permutation()
        idx = self._perm[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self._perm = int(state["epoch"]), int(state["offset"]), None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=auto or cpu.")
    return device


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``auto``; fp32 (no autocast) on CPU unless ``bf16`` is asked for."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _sparse_head(model: Any) -> bool:
    """Whether the model exposes a backbone + ``lm_head`` so logits can be computed at labelled positions only."""
    return hasattr(model, "lm_head") and hasattr(model, "model") and hasattr(model.model, "aux_loss")


def apply_memory_settings(model: Any, tc: Any) -> None:
    """``train.activation_checkpointing`` / ``train.activation_offload`` on a zoo model (see docs/long-context.md)."""
    ac = tc.activation_checkpointing
    if ac is not False:
        try:
            model.gradient_checkpointing_enable(mixers=None if ac is True else list(ac), offload=tc.activation_offload)
        except ValueError as e:
            raise ValueError(f"train.activation_checkpointing: {e}") from None
    elif tc.activation_offload:
        for module in model.modules():
            if hasattr(module, "activation_offload"):
                module.activation_offload = True


def lm_step(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, sparse: bool):
    """Forward one batch: ``(lm_loss, aux_loss | None, preds, targets)`` over the labelled positions.

    ``sparse`` (a zoo LM: backbone + ``lm_head``) runs the LM head only where a label exists (MQAR labels ~6% of
    positions), in tiles of ``model.config.loss_chunk_size`` rows (``zoo.models.loss``), so no ``(B, L, V)`` logits
    exist at any length; the loss equals ``model(input_ids, labels=labels).loss`` (which also includes the
    auxiliary losses).
    """
    shard = sequence.active()  # sequence parallel: a slice of each sequence; its last target is the next slice's
    targets = shifted_targets(labels) if shard is None else sequence.next_token_targets(labels, shard)
    mask = targets != IGNORE_INDEX
    if sparse:
        hidden = model.model(input_ids=input_ids).last_hidden_state
        tgt = targets[mask]
        chunk = int(getattr(model.config, "loss_chunk_size", 0) or 0) or max(int(tgt.numel()), 1)
        if shard is not None and tgt.numel() == 0:
            # No label in this slice: a zero loss that still runs the backward (the slice's states feed the later
            # ranks) and gives every parameter a gradient, the head's included, as data-parallel reduction expects.
            aux = model.model.aux_loss() if model.training else None
            return (hidden.sum() + model.lm_head.weight.sum()) * 0.0, aux, tgt.clone(), tgt, mask
        loss, preds = tiled_linear_cross_entropy(hidden[mask], model.lm_head.weight, tgt, chunk_size=chunk)
        aux = model.model.aux_loss() if model.training else None
        return loss, aux, preds, tgt, mask
    else:
        out = model(input_ids=input_ids)
        logits = out.logits[mask]
        aux = model.model.aux_loss() if model.training and hasattr(model, "model") else None
    tgt = targets[mask]
    loss = F.cross_entropy(logits.float(), tgt) if tgt.numel() or shard is None else out.logits.sum() * 0.0
    return loss, aux, logits.argmax(-1), tgt, mask


def sequence_parallel_eval_step(step: Any, shard_for: Any) -> Any:
    """An :func:`evaluate` ``forward`` that runs each batch split over the sequence group and gathers the results.

    ``step(input_ids, labels)`` is the (wrapped) :func:`lm_step`; ``shard_for(L)`` gives this rank's shard. The loss
    is the group's token mean, the predictions are gathered back to full length (integers; no activations).
    """

    def forward(x: torch.Tensor, y: torch.Tensor):
        shard = shard_for(x.shape[1])
        with sequence.sequence_parallel(shard):
            loss, aux, preds, tgt, mask = step(shard.take(x), shard.take(y))
        full = torch.full_like(mask, IGNORE_INDEX, dtype=torch.long)
        full[mask] = preds
        stats = torch.stack([loss.detach().double() * tgt.numel(), torch.tensor(float(tgt.numel()), dtype=torch.float64)])
        dist.all_reduce(stats, group=shard.group)
        full_all = torch.cat(list(sequence.all_gather(full, shard).unbind(0)), dim=1)
        mask_all = torch.cat(list(sequence.all_gather(mask.to(torch.uint8), shard).unbind(0)), dim=1).bool()
        return (stats[0] / stats[1].clamp_min(1)).float(), aux, full_all[mask_all], full_all[mask_all], mask_all

    return forward


class LMStep(nn.Module):
    """:func:`lm_step` as a module, so DDP / FSDP2 wrap the whole forward (the sparse head included)."""

    def __init__(self, model: nn.Module, sparse: bool) -> None:
        super().__init__()
        self.model, self.sparse = model, sparse

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        return lm_step(self.model, input_ids, labels, self.sparse)


@torch.no_grad()
def evaluate(
    model: Any,
    dataset: TokenDataset,
    *,
    batch_size: int = 64,
    max_batches: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    forward: Any = None,
) -> dict[str, float]:
    """Eval loss (mean over labelled tokens) and accuracy (mean over labelled positions, then examples).

    ``forward(input_ids, labels)``: what runs a batch (default :func:`lm_step` on ``model``; a sharded run passes
    its wrapped :class:`LMStep`, called on every rank).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sparse = _sparse_head(model)
    loss_sum, n_tok, accs = 0.0, 0, []
    n = len(dataset)
    stops = range(0, n, batch_size)
    if max_batches > 0:
        stops = stops[:max_batches]
    try:
        for s in stops:
            x = dataset.input_ids[s : s + batch_size].to(device)
            y = dataset.labels[s : s + batch_size].to(device)
            with autocast_for(device, precision):
                loss, _, preds, tgt, mask = forward(x, y) if forward is not None else lm_step(model, x, y, sparse)
            loss_sum += float(loss) * tgt.numel()
            n_tok += tgt.numel()
            full = torch.full_like(y, IGNORE_INDEX)
            full[mask] = preds
            accs.append(per_example_accuracy(full, shifted_targets(y)).cpu())
    finally:
        model.train(was_training)
    acc = torch.cat(accs) if accs else torch.zeros(0)
    return {
        "loss": loss_sum / max(n_tok, 1),
        "accuracy": float(acc.mean()) if acc.numel() else float("nan"),
        "examples": int(acc.numel()),
    }


def check_vocab(model_vocab: int, data: TokenDataset, task: Any) -> None:
    top = int(data.input_ids.max()) if len(data) else 0
    if top >= model_vocab:
        what = "the tokenizer" if task.name == "text" else f"task.vocab_size={task.vocab_size}"
        raise ValueError(
            f"{what} produces token id {top} but model.vocab_size={model_vocab}; "
            f"set model.vocab_size >= {top + 1} (a task YAML may set both)."
        )


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool, write: bool = True) -> None:
    """Refuse to clobber a run (every rank checks); clear it for --overwrite and create ``out`` (when ``write``)."""
    existing = [p.name for p in list_checkpoints(out)] + ([FINAL] if (out / FINAL).exists() else [])
    if existing and not resume:
        if not overwrite:
            raise CheckpointError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out."
            )
        if not write:
            return
        for name in existing:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS, CURVES):
            (out / name).unlink(missing_ok=True)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)  # left by a save that was killed mid-write (its process is gone)


def train(
    config: Any,
    out_dir: str | Path,
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train the run ``config`` (a RunConfig or anything ``zoo.load_config`` reads) into ``out_dir``.

    ``resume``: True continues from the latest checkpoint in ``out_dir``; a path continues from that checkpoint.
    ``stop_after``: stop after this step as if interrupted (the schedule still spans ``train.steps``).
    """
    import zoo

    run = config if isinstance(config, zoo.RunConfig) else zoo.load_config(config)
    tc = run.train
    out = Path(out_dir)
    ckpt: Path | None = None
    if resume:
        ckpt = latest_checkpoint(out) if resume is True else resolve_checkpoint(resume)
        if ckpt is None:
            raise CheckpointError(f"--resume: {out} holds no checkpoint to resume; drop --resume to start a new run.")
        state = load_trainer_state(ckpt)
        diff = model_config_diff(zoo.ZooConfig.from_pretrained(ckpt), run.model)
        saved = load_run_config(ckpt) or {}
        if saved.get("task") is not None:  # fields added to TaskConfig since the save are not compared
            new_task = {k: v for k, v in run.to_dict()["task"].items() if k in saved["task"]}
            diff += dict_diff(saved["task"], new_task, "task")
        if saved.get("train") is not None:  # only the keys declared safe may change; new fields are not compared
            new_train = run.to_dict()["train"]
            keep = [k for k in saved["train"] if k in new_train and k not in RESUME_SAFE_KEYS]
            diff += dict_diff({k: saved["train"][k] for k in keep}, {k: new_train[k] for k in keep}, "train")
        if diff:
            safe = ", ".join(f"train.{k}" for k in RESUME_SAFE_KEYS)
            raise CheckpointError(
                f"cannot resume {ckpt}: the config differs from the checkpoint's at {', '.join(diff[:8])}; "
                f"use the same config to resume (of the train section only {safe} may change), "
                "or start a new run with another --out."
            )
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    env = zdist.setup(resolve_device(tc.device), tc.parallel)
    try:
        return _train(run, out, env, ckpt, state if ckpt is not None else None, bool(resume), overwrite, stop_after)
    finally:
        env.close()


def _train(run: Any, out: Path, env: zdist.DistEnv, ckpt: Path | None, state: dict | None, resume: bool,
           overwrite: bool, stop_after: int | None) -> TrainResult:
    import zoo

    tc, task = run.train, run.task
    world, groups, seq = env.world_size, env.data_world, env.sequence
    if tc.batch_size % groups:
        raise ValueError(
            f"train.batch_size={tc.batch_size} does not split over {groups} data-parallel groups; "
            f"set train.batch_size to a multiple of {groups} (it is the global batch per micro-step)."
        )
    if state is not None:
        saved = (int(state.get("world_size", 1)), state.get("parallel_data", "none"), int(state.get("parallel_sequence", 1)))
        if saved != (world, env.data, seq):
            raise CheckpointError(
                f"cannot resume {ckpt}: it was written by {saved[0]} process(es) with parallel.data={saved[1]}, "
                f"sequence={saved[2]} and this run has {world} with parallel.data={env.data}, sequence={seq}; "
                "resume with the same launch."
            )
    _prepare_out_dir(out, resume, overwrite, write=env.main)
    zdist.barrier()

    device = env.device
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    train_set, eval_set = build_task(task)
    seq_len = int(train_set.input_ids.shape[1])
    if seq > 1 and seq_len % seq:
        raise ValueError(
            f"the task's sequences have {seq_len} tokens, which do not split into train.parallel.sequence={seq} equal "
            f"slices; set task.seq_len to a multiple of {seq}."
        )
    tokenizer = load_tokenizer(task.tokenizer) if task.name == "text" else None
    check_vocab(run.model.vocab_size, train_set, task)

    if ckpt is not None:
        with quiet_hf_progress():
            model = zoo.ZooForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    else:
        model = zoo.build_model(run)
    model.to(device).train()
    apply_memory_settings(model, tc)
    sparse = _sparse_head(model)  # the LM head at labelled positions only, tiled: never (B, L, V) logits
    step_module = LMStep(model, sparse)
    wrapped = zdist.wrap(step_module, env, zdist.blocks_of(model))  # FSDP2 shards model's parameters in place
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc)
    sampler = EpochSampler(len(train_set), tc.batch_size, tc.seed)
    micro = tc.batch_size // groups
    lo, hi = env.data_rank * micro, (env.data_rank + 1) * micro  # the ranks of a sequence group share the rows
    history: list[dict] = []
    window = _Window()
    step = 0
    if state is not None:
        zdist.load_optimizer_state_dict(wrapped, optimizer, state["optimizer"], env)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data"])
        window.load_state_dict(state["window"])
        history = list(state["history"])
        step = int(state["step"])
        set_rng_state(state["rng"])
    if env.main:
        write_jsonl(out / METRICS, history)

    run_dict = run.to_dict()
    eval_bs = tc.eval_batch_size or tc.batch_size
    eval_forward = wrapped if env.data == "fsdp" else None  # FSDP2: every rank runs the sharded forward
    if seq > 1:  # sequence parallel: each rank evaluates its slice of every sequence
        eval_forward = sequence_parallel_eval_step(eval_forward or step_module, lambda n: zdist.sequence_shard(env, n))
    last_eval = next((r for r in reversed(history) if "eval/accuracy" in r), None)
    last_ckpt = ckpt
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_update = tc.grad_accum * tc.batch_size * int(train_set.input_ids.shape[1])
    bar = tqdm(total=tc.steps, initial=step, disable=not (tc.progress and env.main), desc="train",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file: a line every 30 s
    try:
        with (open(out / METRICS, "a") if env.main else contextlib.nullcontext()) as log:
            while step < end:
                t_start = time.perf_counter()
                for k in range(tc.grad_accum):
                    idx = sampler.next()  # the global micro-batch: the same on every rank
                    x, y = train_set.batch(idx[lo:hi])  # this rank's share of it
                    n_global = int((shifted_targets(train_set.labels[idx]) != IGNORE_INDEX).sum()) if world > 1 else 0
                    shard = zdist.sequence_shard(env, x.shape[1])
                    if shard is not None:  # and of each sequence, this rank's slice
                        x, y = shard.take(x), shard.take(y)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    # the backward too runs under the shard: recomputed (checkpointed) blocks exchange states again
                    with zdist.no_sync(wrapped, env, skip=k < tc.grad_accum - 1), sequence.sequence_parallel(shard):
                        with autocast_for(device, tc.precision):
                            loss, aux, preds, tgt, _ = wrapped(x, y)
                            if world > 1:
                                # token mean over the global micro-batch: this rank's sum / the global count,
                                # times the world size that DDP / FSDP2 divide the summed gradients by
                                obj = loss * (tgt.numel() * world / n_global)
                            else:
                                obj = loss
                            # a sequence group's auxiliary loss is one value whose gradient shares its ranks hold
                            total = obj if aux is None else obj + aux * seq
                        (total / tc.grad_accum).backward()
                    if world > 1:  # the metrics of the global micro-batch: sums over the ranks
                        zero = torch.zeros((), dtype=torch.float64, device=device)
                        stats = torch.stack([loss.detach().double() * tgt.numel(), (preds == tgt).sum().double(),
                                             zero + tgt.numel(), zero if aux is None else aux.detach().double()])
                        stats = zdist.all_sum(stats, env).cpu()
                        window.add_counts(stats[0] / stats[2], None if aux is None else stats[3] / world,
                                          stats[1], stats[2], x.numel() * world)
                    else:
                        window.add(loss, aux, preds, tgt, x.numel())
                gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
                if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
                    gnorm = gnorm.full_tensor()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.seconds += time.perf_counter() - t_start
                bar.update(1)

                is_last = step == tc.steps
                if step % tc.log_every == 0 or is_last:
                    row = window.row(step, lr, float(gnorm))
                    row["world_size"] = world
                    row["tokens"] = step * tokens_per_update  # global tokens seen
                    history.append(row)
                    if env.main:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
                if len(eval_set) and ((tc.eval_every > 0 and step % tc.eval_every == 0) or is_last):
                    ev = evaluate(model, eval_set, batch_size=eval_bs, max_batches=tc.eval_batches,
                                  device=device, precision=tc.precision, forward=eval_forward)
                    last_eval = {"step": step, "eval/loss": ev["loss"], "eval/accuracy": ev["accuracy"]}
                    history.append(last_eval)
                    if env.main:
                        log.write(json.dumps(last_eval) + "\n")
                        log.flush()
                    if env.main:
                        bar.write(f"step {step}: eval loss {ev['loss']:.4f}  accuracy {ev['accuracy']:.4f}")
                periodic = tc.save_every > 0 and step % tc.save_every == 0
                if periodic or is_last:
                    full_sd = zdist.full_model_state_dict(step_module, env)  # FSDP2: every rank gathers
                    opt_sd = zdist.optimizer_state_dict(wrapped, optimizer, env)
                    name = FINAL if is_last else f"checkpoint-{step}"
                    if env.main:
                        trainer_state = {
                            "step": step,
                            "optimizer": opt_sd,
                            "scheduler": scheduler.state_dict(),
                            "data": sampler.state_dict(),
                            "window": window.state_dict(),
                            "rng": rng_state(),
                            "history": history,
                            "world_size": world,
                            "parallel_data": env.data,
                            "parallel_sequence": seq,
                        }
                        model_sd = None if full_sd is None else {
                            k.removeprefix("model."): v for k, v in full_sd.items()}
                        save_checkpoint(out / name, model, run_config=run_dict, trainer_state=trainer_state,
                                        tokenizer=tokenizer, state_dict=model_sd)
                        if not is_last:
                            rotate_checkpoints(out, tc.keep_checkpoints)
                        plot_curves(history, out / CURVES, title=" + ".join(Path(s).stem for s in run.source))
                    last_ckpt = out / name
                    zdist.barrier()  # every rank waits until the checkpoint is complete
    finally:
        bar.close()
    if history and env.main:
        plot_curves(history, out / CURVES, title=" + ".join(Path(s).stem for s in run.source))
    return TrainResult(
        checkpoint=last_ckpt,
        step=step,
        eval_loss=last_eval["eval/loss"] if last_eval else None,
        eval_accuracy=last_eval["eval/accuracy"] if last_eval else None,
        history=history,
    )


class _Window:
    """Running sums of the training metrics between two log rows (kept as tensors: no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64)
        self.aux: torch.Tensor | None = None
        self.correct = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.micro = 0
        self.tokens = 0
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, aux: torch.Tensor | None, preds: torch.Tensor, tgt: torch.Tensor,
            n_tokens: int) -> None:
        self.add_counts(loss, aux, (preds == tgt).sum(), tgt.numel(), n_tokens)

    def add_counts(self, loss: torch.Tensor, aux: torch.Tensor | None, correct: Any, count: Any,
                   n_tokens: int) -> None:
        """One micro-batch: its mean loss, aux loss, correct / labelled counts and tokens (global in a group)."""
        self.loss = self.loss + loss.detach().double().cpu()
        if aux is not None:
            a = aux.detach().double().cpu()
            self.aux = a if self.aux is None else self.aux + a
        self.correct = self.correct + torch.as_tensor(correct).double().cpu()
        self.count = self.count + count
        self.micro += 1
        self.tokens += n_tokens

    def row(self, step: int, lr: float, grad_norm: float) -> dict:
        """One ``metrics.jsonl`` row (train loss and token accuracy averaged over the window), then reset."""
        row = {
            "step": step,
            "train/loss": float(self.loss) / max(self.micro, 1),
            "train/accuracy": float(self.correct) / max(float(self.count), 1.0),
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if self.aux is not None:
            row["train/aux_loss"] = float(self.aux) / max(self.micro, 1)
        row["tokens_per_s"] = round(self.tokens / max(self.seconds, 1e-9), 1)
        self.reset()
        return row

    def state_dict(self) -> dict:
        return {"loss": self.loss, "aux": self.aux, "correct": self.correct, "count": self.count, "micro": self.micro}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.aux = state["loss"], state["aux"]
        self.correct, self.count, self.micro = state["correct"], state["count"], int(state["micro"])
