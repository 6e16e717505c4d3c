"""Fine-tuning a zoo model with transformers' ``Trainer``: causal LM or sequence classifier, optional LoRA.

Data comes from local json/jsonl/csv/parquet/text files through HF ``datasets`` (or a named hub dataset when
a network is there). Causal-LM documents can be packed several to a row: the collator concatenates them into
one ``(1, T)`` row and emits ``cu_seqlens``, so no information and no loss term crosses a document boundary.

Python: :func:`finetune`; command line: ``zoo finetune`` (:func:`finetune_argument_parser` / :func:`run_finetune`)
or ``python scripts/finetune.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from zoo.loading import is_checkpoint

IGNORE_INDEX = -100
TASKS = ("causal_lm", "classification")


class FinetuneError(ValueError):
    """A fine-tuning input problem, stated in one sentence naming the fix."""


#: The FinetuneConfig fields that are TrainingArguments fields (zoo name -> TrainingArguments name): read for their
#: ``--help`` (TrainingArguments' own) and by :func:`finetune` to fill the run's TrainingArguments.
TRAINING_ARGUMENTS = {
    "epochs": "num_train_epochs", "max_steps": "max_steps", "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "lr": "learning_rate", "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps", "lr_scheduler": "lr_scheduler_type", "max_grad_norm": "max_grad_norm",
    "logging_steps": "logging_steps", "seed": "seed",
}


def _option(default: Any = dataclasses.MISSING, help: str = "", *, trainer: str | None = None):
    """A ``zoo finetune`` flag (``HfArgumentParser`` passes the metadata to ``add_argument``). ``trainer``: the
    FinetuneConfig field name of a :data:`TRAINING_ARGUMENTS` entry, whose help is TrainingArguments' own (plus ``help``)."""
    if trainer is not None:
        from transformers import TrainingArguments

        name = TRAINING_ARGUMENTS[trainer]
        own = next(f for f in dataclasses.fields(TrainingArguments) if f.name == name).metadata.get("help", "")
        help = " ".join(f"{own} {help}".split()) + f" (TrainingArguments.{name})"
        if name != trainer:  # the TrainingArguments flag works too
            aliases = list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))
            return field(default=default, metadata={"help": help.replace("%", "%%"), "aliases": aliases})
    return field(default=default, metadata={"help": help.replace("%", "%%")})  # argparse formats help with %


@dataclass
class FinetuneOptions:
    """The flags of ``zoo finetune`` beside its MODEL argument, one per field: ``HfArgumentParser`` builds them from
    these declarations (a training hyperparameter shows the help of the ``TrainingArguments`` field it sets)."""

    data: str = _option(help="local json/jsonl/csv/parquet/txt file or folder; a NAME that is no local path is "
                             "downloaded from the Hugging Face Hub as a dataset (refused when HF_HUB_OFFLINE=1)")
    out: str = _option(help="output folder: Trainer checkpoints, then final/ with the model and tokenizer")
    task: Literal["causal_lm", "classification"] = _option("causal_lm", "causal LM or sequence classifier head")
    eval_data: str | None = _option(None, "held-out file; None: no evaluation")
    text_column: str = _option("text", "column holding the text (txt files: each line is a document)")
    label_column: str = _option("label", "classification only: integer or string labels")
    tokenizer: str | None = _option(None, "'byte', a local tokenizer folder, or None: the checkpoint's own, else byte")
    seq_len: int = _option(512, "max tokens per document (longer causal-LM documents are split, classifier inputs cut)")
    pack: bool = _option(False, "causal LM: pack documents into rows of seq_len tokens (DataCollatorWithFlattening)")
    epochs: float = _option(1.0, trainer="epochs")
    max_steps: int = _option(-1, trainer="max_steps")
    batch_size: int = _option(8, "(packed rows when --pack)", trainer="batch_size")
    grad_accum: int = _option(1, trainer="grad_accum")
    lr: float = _option(1e-4, "(AdamW)", trainer="lr")
    weight_decay: float = _option(0.0, trainer="weight_decay")
    warmup_steps: int = _option(0, trainer="warmup_steps")
    lr_scheduler: str = _option("cosine", "(linear, cosine, constant, ...)", trainer="lr_scheduler")
    max_grad_norm: float = _option(1.0, trainer="max_grad_norm")
    gradient_checkpointing: bool = _option(False, "recompute each block in backward (less memory, more time)")
    precision: Literal["auto", "fp32", "bf16"] = _option("auto", "auto: bf16 on CUDA when supported, else fp32")
    lora: bool = _option(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _option(8, "LoRA rank")
    lora_alpha: int = _option(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _option(0.0, "dropout on the LoRA input")
    lora_targets: list[str] | None = _option(None, "None: every Linear named *proj inside the mixers (default_lora_targets)")
    resize_embeddings: bool = _option(False, "grow the embedding when the tokenizer has more tokens than the model")
    resume: bool = _option(False, "continue from the newest checkpoint-* in --out")
    save_steps: int = _option(0, "updates between resumable checkpoint-* folders; 0: none (only final/)")
    logging_steps: int = _option(10, trainer="logging_steps")
    eval_steps: int = _option(0, "updates between evaluations; 0: evaluate at the end only (when --eval-data is set)")
    seed: int = _option(0, "(model init of fresh models, data order, dropout)", trainer="seed")
    progress: bool = _option(True, "show the Trainer's progress bar")


@dataclass
class FinetuneConfig(FinetuneOptions):
    """Everything one fine-tuning run needs: the model, the options (:class:`FinetuneOptions`, the command-line flags)
    and further ``TrainingArguments``."""

    #: a zoo checkpoint folder (config.json + safetensors) or a config YAML for a fresh model
    model: str = field(kw_only=True)
    #: further TrainingArguments, passed through
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)


# ----- data ------------------------------------------------------------------------------------------

def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE / HF_DATASETS_OFFLINE forbid network access to the Hub."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_table(source: str, *, key: str = "--data"):
    """A ``datasets.Dataset`` from a local file / folder (format from the extension) or a hub dataset name."""
    import datasets

    from zoo.data.text import FORMATS

    p = Path(os.path.expanduser(source))
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix.lower() in FORMATS)
        if not files:
            raise FinetuneError(f"{key}: folder {source!r} holds no {'/'.join(sorted(FORMATS))} files; add a data file.")
    elif p.is_file():
        files = [str(p)]
    else:
        files = []
    if files:
        formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
        if None in formats or len(formats) != 1:
            raise FinetuneError(
                f"{key}: cannot read {source!r}; use files of one format with extension {', '.join(sorted(FORMATS))}."
            )
        return datasets.load_dataset(formats.pop(), data_files=files, split="train")
    if _hub_offline():
        raise FinetuneError(
            f"{key}: {source!r} is not a local file or folder, and HF_HUB_OFFLINE=1 forbids loading it from the "
            "Hugging Face Hub; pass a local json/jsonl/csv/parquet/txt file (or unset HF_HUB_OFFLINE)."
        )
    try:
        return datasets.load_dataset(source, split="train")
    except Exception as e:  # offline, unknown name, ...: one message for all of them
        raise FinetuneError(
            f"{key}: {source!r} is not a local file and could not be loaded as a hub dataset ({type(e).__name__}); "
            "pass a local json/jsonl/csv/parquet/txt file."
        ) from None


def _column(table, column: str, source: str, flag: str) -> list:
    if column not in table.column_names:
        raise FinetuneError(
            f"{flag}: column {column!r} is not in {source!r}; its columns are {', '.join(table.column_names)}. "
            f"Pass {flag} with one of them."
        )
    return table[column]


def encode_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text (no special tokens added)."""
    from zoo.data.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return [list(t.encode("utf-8")) for t in texts]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def split_documents(docs: list[list[int]], seq_len: int, eos_id: int | None) -> list[list[int]]:
    """Each document followed by eos, cut into pieces of at most ``seq_len`` tokens (empty documents dropped)."""
    out = []
    for d in docs:
        d = list(d) + ([eos_id] if eos_id is not None else [])
        out.extend(d[i : i + seq_len] for i in range(0, len(d), seq_len) if len(d) > (eos_id is not None))
    return [p for p in out if p]


def pack_documents(pieces: list[list[int]], seq_len: int) -> list[dict[str, list[int]]]:
    """Greedy in-order packing: consecutive pieces share a row while their total stays within ``seq_len``."""
    rows: list[dict[str, list[int]]] = []
    cur_ids: list[int] = []
    cur_len: list[int] = []
    for p in pieces:
        if cur_ids and len(cur_ids) + len(p) > seq_len:
            rows.append({"input_ids": cur_ids, "lengths": cur_len})
            cur_ids, cur_len = [], []
        cur_ids = cur_ids + list(p)
        cur_len.append(len(p))
    if cur_ids:
        rows.append({"input_ids": cur_ids, "lengths": cur_len})
    return rows


class PackedCollator:
    """Packed rows (several documents each, from :func:`pack_documents`) as one ``(1, T)`` row: transformers'
    ``DataCollatorWithFlattening`` over the documents (``position_ids`` restart at each, ``-100`` at each document's
    first label), plus their ``cu_seqlens``.

    The model reads that packing, so no state and no loss term crosses a document boundary: every document's loss is
    what it would be on its own.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        docs, lengths = [], []
        for f in features:
            start = 0
            for n in f["lengths"]:
                docs.append({"input_ids": list(f["input_ids"][start : start + n])})
                lengths.append(n)
                start += n
        batch = dict(self.flatten(docs))
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return {**batch, "cu_seqlens": cu}


class PaddedCollator:
    """Right-pad a batch; causal-LM labels are the inputs with ``-100`` on padding, classifier labels pass through."""

    def __init__(self, pad_id: int, *, classification: bool = False) -> None:
        self.pad_id = pad_id
        self.classification = classification

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(f["input_ids"]) for f in features)
        x = torch.full((len(features), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(features), T, dtype=torch.long)
        for i, f in enumerate(features):
            x[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        out = {"input_ids": x, "attention_mask": mask}
        if self.classification:
            out["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
        else:
            out["labels"] = x.masked_fill(mask == 0, IGNORE_INDEX)
        return out


def per_document_loss(logits: torch.Tensor, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each packed document: ``(N,)`` from ``(1, T, V)`` logits of one packed row."""
    out = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        out.append(nn.functional.cross_entropy(logits[0, a : b - 1].float(), input_ids[0, a + 1 : b]))
    return torch.stack(out)


def build_label_map(labels: list) -> dict:
    """``label value -> class id``: integers map to themselves, strings to their sorted order."""
    if any(v is None for v in labels):
        raise FinetuneError("--label-column: some rows have no label; remove them or fill the label column.")
    if all(isinstance(v, bool) or isinstance(v, int) for v in labels):
        if min(labels) < 0:
            raise FinetuneError("--label-column: integer labels must be 0..num_labels-1; renumber the negative ones.")
        return {i: i for i in range(max(labels) + 1)}
    if all(isinstance(v, str) for v in labels):
        return {v: i for i, v in enumerate(sorted(set(labels)))}
    raise FinetuneError("--label-column: labels must be all integers or all strings; convert the column to one kind.")


# ----- model, tokenizer, LoRA --------------------------------------------------------------------------

def load_tokenizer_for(model_path: str, tokenizer: str | None):
    """:func:`zoo.loading.load_tokenizer` (the checkpoint's own, else bytes), its errors as FinetuneError."""
    from zoo.loading import LoadError, load_tokenizer

    try:
        return load_tokenizer(model_path, tokenizer)
    except LoadError as e:
        raise FinetuneError(str(e)) from None


def load_model(model_path: str, task: str, *, num_labels: int | None = None, id2label: dict | None = None):
    """A ``ZooForCausalLM`` / ``ZooForSequenceClassification`` from a checkpoint folder or a fresh one from a YAML."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import zoo

    if task not in TASKS:
        raise FinetuneError(f"--task: {task!r} is not a task; choose one of {', '.join(TASKS)}.")
    extra = {}
    if task == "classification":
        extra = {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in (id2label or {}).items()}}
    if is_checkpoint(model_path):
        if task == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(str(Path(model_path).resolve()))
        return AutoModelForSequenceClassification.from_pretrained(
            str(Path(model_path).resolve()), ignore_mismatched_sizes=True, **extra
        )
    p = Path(model_path)
    if p.suffix.lower() in (".yaml", ".yml") and p.is_file():
        run = zoo.load_config(str(p))
        if task == "classification":
            run.model.num_labels = num_labels
            run.model.id2label, run.model.label2id = extra["id2label"], extra["label2id"]
        return zoo.build_model(run, head="causal_lm" if task == "causal_lm" else "classification")
    raise FinetuneError(
        f"--model: {model_path!r} is neither a checkpoint folder with config.json nor a config YAML; "
        "pass the folder written by `zoo train` / save_pretrained or a configs/*.yaml file."
    )


def check_vocab(model, tokenizer, *, resize: bool) -> None:
    """Fail (or grow the embedding when ``resize``) when the tokenizer has more ids than the model's vocabulary."""
    n_tok, n_model = len(tokenizer), model.config.vocab_size
    if n_tok <= n_model:
        return
    if not resize:
        raise FinetuneError(
            f"--tokenizer: the tokenizer has {n_tok} tokens but the model's vocabulary has {n_model}; use the "
            "tokenizer the model was trained with (e.g. byte) or pass --resize-embeddings to grow the embedding."
        )
    model.resize_token_embeddings(n_tok)


def linear_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of every ``nn.Linear`` inside the mixers (what LoRA can target)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".mixer." in f".{name}.":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def default_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of the mixers' ``nn.Linear`` projections named ``*proj`` (q/k/v/o_proj, in/out/x/dt_proj, ...)."""
    targets = [n for n in linear_names(model) if n.endswith("proj")]
    return targets or linear_names(model)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lora(model: nn.Module, cfg: FinetuneConfig):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA on ``cfg.lora_targets`` (default: every mixer *proj)."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise FinetuneError("--lora needs peft; install it with pip install 'seq-zoo[peft]'.") from None
    targets = list(cfg.lora_targets or default_lora_targets(model))
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise FinetuneError(
            f"--lora-targets: {', '.join(missing)} match no Linear layer of this model; choose among "
            f"{', '.join(linear_names(model))}."
        )
    task_type = TaskType.CAUSAL_LM if cfg.task == "causal_lm" else TaskType.SEQ_CLS
    lcfg = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        task_type=task_type, modules_to_save=["score"] if cfg.task == "classification" else None,
    )
    return get_peft_model(model, lcfg)


def load_finetuned(path: str | Path, *, merge: bool = True):
    """A fine-tuned model from ``path``: a full checkpoint, or a LoRA adapter folder (merged into its base when
    ``merge``); :func:`zoo.loading.load_model`."""
    from zoo.loading import load_model

    return load_model(path, merge=merge)


# ----- the run ---------------------------------------------------------------------------------------

def _datasets(cfg: FinetuneConfig, tokenizer, label_map: dict | None):
    """The tokenised training and evaluation sets, as ``datasets.Dataset`` rows."""
    from datasets import Dataset

    def build(source: str, flag: str):
        table = load_table(source, key=flag)
        text_col = "text" if "text" in table.column_names and len(table.column_names) == 1 else cfg.text_column
        texts = _column(table, text_col, source, "--text-column")
        keep = [i for i, t in enumerate(texts) if t]
        docs = encode_documents([texts[i] for i in keep], tokenizer)
        if cfg.task == "classification":
            labels = _column(table, cfg.label_column, source, "--label-column")
            rows = []
            for i, d in zip(keep, docs):
                if labels[i] not in label_map:
                    raise FinetuneError(
                        f"{flag}: label {labels[i]!r} does not occur in the training data; add it there or drop the row."
                    )
                rows.append({"input_ids": d[: cfg.seq_len], "label": label_map[labels[i]]})
            return Dataset.from_list(rows)
        pieces = split_documents(docs, cfg.seq_len, tokenizer.eos_token_id)
        return Dataset.from_list(pack_documents(pieces, cfg.seq_len) if cfg.pack else [{"input_ids": p} for p in pieces])

    train = build(cfg.data, "--data")
    if len(train) == 0:
        raise FinetuneError(f"--data: {cfg.data!r} holds no non-empty text; check the file and --text-column.")
    evalset = build(cfg.eval_data, "--eval-data") if cfg.eval_data else None
    return train, evalset


def _labels_of(cfg: FinetuneConfig) -> dict | None:
    if cfg.task != "classification":
        return None
    table = load_table(cfg.data, key="--data")
    return build_label_map(list(_column(table, cfg.label_column, cfg.data, "--label-column")))


def _precision(cfg: FinetuneConfig) -> bool:
    if cfg.precision == "bf16":
        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise FinetuneError("--precision bf16 needs a CUDA GPU with bf16 support; use --precision fp32 on this machine.")
        return True
    return cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _atomic_save(model, tokenizer, cfg: FinetuneConfig, dest: Path, extra: dict) -> None:
    """Write ``dest`` (full model + tokenizer + settings; LoRA: also ``adapter/``) through a temporary folder.

    The same atomic write and rank-0 rule as ``zoo train``: call it on rank 0 only, the others wait at a barrier.
    """
    from zoo.train.checkpoint import atomic_directory, quiet_hf_progress

    def write(tmp: Path) -> None:
        m = model
        with quiet_hf_progress():
            if hasattr(m, "merge_and_unload"):  # a PeftModel: keep the adapter, save the merged model beside it
                m.save_pretrained(str(tmp / "adapter"))
                m = m.merge_and_unload()
            m.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "finetune_config.json").write_text(
            json.dumps({**dataclasses.asdict(cfg), **extra}, indent=2, default=str))

    atomic_directory(dest, write)


def _run_arguments(cfg: FinetuneConfig, *, has_eval: bool, bf16: bool) -> dict[str, Any]:
    """The TrainingArguments a run sets from its FinetuneConfig (``cfg.extra`` may add others, not these)."""
    return {
        "output_dir": cfg.out,
        **{name: getattr(cfg, key) for key, name in TRAINING_ARGUMENTS.items()},
        "per_device_eval_batch_size": cfg.batch_size,
        "bf16": bf16,
        "save_strategy": "steps" if cfg.save_steps > 0 else "no",
        "save_steps": cfg.save_steps if cfg.save_steps > 0 else 500,
        "eval_strategy": "steps" if has_eval and cfg.eval_steps > 0 else "no",
        "eval_steps": cfg.eval_steps if cfg.eval_steps > 0 else None,
        "report_to": "none",
        "disable_tqdm": not cfg.progress,
        "remove_unused_columns": False,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
    }


def finetune(cfg: FinetuneConfig | None = None, **kwargs) -> dict:
    """Run one fine-tuning job; returns ``{"final": path, "train_loss": ..., "eval_loss": ... (when evaluated)}``.

    Pass a :class:`FinetuneConfig` or its fields as keyword arguments.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    cfg = cfg or FinetuneConfig(**kwargs)
    for name in ("seq_len", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)}).")
    if cfg.pack and cfg.task != "causal_lm":
        raise FinetuneError("--pack applies to causal-LM fine-tuning only; drop --pack for --task classification.")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer_for(cfg.model, cfg.tokenizer)
    label_map = _labels_of(cfg)
    id2label = {i: str(v) for v, i in label_map.items()} if label_map else None
    model = load_model(cfg.model, cfg.task, num_labels=len(label_map) if label_map else None, id2label=id2label)
    check_vocab(model, tokenizer, resize=cfg.resize_embeddings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    train, evalset = _datasets(cfg, tokenizer, label_map)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.lora:
        model = apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    collator = PackedCollator() if cfg.pack else PaddedCollator(pad_id, classification=cfg.task == "classification")
    out = Path(cfg.out)
    bf16 = _precision(cfg)
    fixed = _run_arguments(cfg, has_eval=evalset is not None, bf16=bf16)
    clash = sorted(set(fixed) & set(cfg.extra))
    if clash:
        raise FinetuneError(f"extra: {', '.join(clash)} are set by zoo finetune from its own options; set those options "
                            "instead (see zoo finetune --help).")
    args = TrainingArguments(**fixed, **cfg.extra)
    trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=evalset)
    trainer.model_accepts_loss_kwargs = False  # the zoo models average their own loss; Trainer scales for accumulation
    resume = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        if resume is None:
            raise FinetuneError(
                f"--resume: {str(out)!r} holds no checkpoint-* folder; run once with --save-steps N first, or drop --resume."
            )
    result = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, Any] = {"train_loss": float(result.training_loss), "steps": int(result.global_step)}
    if evalset is not None:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    final = out / "final"
    from zoo.train import distributed as zdist

    if zdist.is_main():  # under torchrun / accelerate launch only rank 0 writes final/; the others wait for it
        _atomic_save(trainer.model, tokenizer, cfg, final, {"id2label": id2label, **metrics})
        (out / "finetune_metrics.json").write_text(json.dumps({**metrics, "final": str(final)}, indent=2))
    zdist.barrier()
    metrics["final"] = str(final)
    return metrics


# ----- command line ----------------------------------------------------------------------------------

MODEL_HELP = "zoo checkpoint folder (or one made by `zoo convert`), or a config YAML for a fresh model"


def finetune_argument_parser() -> argparse.ArgumentParser:
    """The flags of ``zoo finetune``, built by transformers' ``HfArgumentParser``, as a parser to pass in
    ``parents=[...]``: MODEL, one flag per :class:`FinetuneOptions` field (a training hyperparameter also answers to
    its TrainingArguments name, e.g. ``--learning-rate`` for ``--lr``), then every other ``TrainingArguments`` field
    (``--optim``, ``--lr-scheduler-kwargs``, ...), passed through to the Trainer as ``FinetuneConfig.extra``."""
    from transformers import HfArgumentParser

    p = HfArgumentParser([FinetuneOptions, further_training_arguments()], add_help=False)
    p.add_argument("model", help=MODEL_HELP)
    return p


@functools.cache
def further_training_arguments() -> type:
    """A dataclass of the ``TrainingArguments`` fields that zoo finetune does not set from its own options."""
    import typing

    from transformers import TrainingArguments

    own = {f.name for f in dataclasses.fields(FinetuneOptions)} | set(TRAINING_ARGUMENTS.values())
    own |= set(_run_arguments(FinetuneConfig(model="", data="", out=""), has_eval=False, bf16=False))
    hints = typing.get_type_hints(TrainingArguments)
    fields = []
    for f in dataclasses.fields(TrainingArguments):
        if f.init and f.name not in own and not f.name.startswith("_"):
            default = ({"default_factory": f.default_factory} if f.default is dataclasses.MISSING
                       else {"default": f.default})
            fields.append((f.name, hints[f.name], field(metadata=f.metadata, **default)))
    cls = dataclasses.make_dataclass("FurtherTrainingArguments", fields)
    cls._argument_group_name = "further TrainingArguments (passed to the Trainer)"
    return cls


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed ``zoo finetune`` arguments; further TrainingArguments given on the
    command line (those that differ from their default) go to ``extra``."""
    from transformers import HfArgumentParser

    values = vars(args)
    # the defaults as the parser gives them (it turns some, e.g. debug="" into None)
    defaults = vars(HfArgumentParser(further_training_arguments()).parse_known_args([])[0])
    extra = {k: values[k] for k, v in defaults.items() if k in values and values[k] != v}
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"extra"}
    return FinetuneConfig(**{k: v for k, v in values.items() if k in names}, extra=extra)


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``finetune`` sub-command to an argparse ``subparsers`` object and return its parser."""
    return subparsers.add_parser("finetune", parents=[finetune_argument_parser()],
                                 help="fine-tune a zoo model with transformers' Trainer (optionally LoRA)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_finetune(args: argparse.Namespace) -> int:
    """Entry point of ``zoo finetune``: run the job, print where the model is and how to load it."""
    try:
        metrics = finetune(config_from_args(args))
    except FinetuneError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "final"}))
    print(f"fine-tuned model: {metrics['final']}")
    print(f"load it with: from zoo.finetune import load_finetuned; model = load_finetuned({metrics['final']!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python scripts/finetune.py ...``: ``zoo finetune`` with the same flags."""
    import sys

    from zoo.cli import main as zoo_main

    return zoo_main(["finetune", *(sys.argv[1:] if argv is None else argv)])
