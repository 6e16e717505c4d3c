"""The ``train:`` and ``task:`` sections of a run config (``zoo.load_config`` validates them from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The train keys `zoo train --resume` lets change (the rest must equal the checkpoint's, so a resumed run stays the
# run that was started): the length (`steps`; the cosine schedule is recomputed over the new total from the current
# step) and how often it evaluates, logs and saves. Read by zoo.train.loop.train and named in its refusal.
RESUME_SAFE_KEYS = ("steps", "eval_every", "eval_batches", "eval_batch_size", "save_every", "keep_checkpoints",
                    "log_every", "progress", "num_threads")


@dataclass
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing of ``zoo train``."""

    steps: int = 1000  # optimizer updates
    batch_size: int = 64  # global examples per micro-batch, whatever the world size (split over the ranks);
    # an update sees batch_size * grad_accum examples
    eval_batch_size: int | None = None  # None: same as batch_size
    lr: float = 1.0e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW; never on norms, biases or a module's `no_weight_decay` names
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per update
    eval_every: int = 200  # steps between evaluations; 0: only at the end
    eval_batches: int = 0  # batches per evaluation; 0: the whole eval set
    save_every: int = 0  # steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2  # periodic checkpoints kept on disk (older ones are deleted); 0 keeps all
    log_every: int = 10  # steps between metrics.jsonl rows / progress-bar updates
    seed: int = 0  # model init and data order
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True  # show a tqdm progress bar
    # Long sequences (docs/long-context.md): recompute each block in backward (true, or a list of mixer names to
    # checkpoint only those blocks of a hybrid), and keep the saved block inputs in CPU memory (CUDA only).
    activation_checkpointing: bool | list[str] = False
    activation_offload: bool = False
    # data: none | ddp | fsdp (unset: ddp when launched on > 1 process); sequence: ranks per sequence (1 only, for now)
    parallel: dict = field(default_factory=lambda: {"data": None, "sequence": 1})

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be at least 1 (got {getattr(self, key)}).")
        for key in ("eval_every", "eval_batches", "save_every", "warmup_steps", "num_threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be 0 or more (got {getattr(self, key)}).")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be positive (got {self.lr}); e.g. 1e-3.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio}); e.g. 0.1.")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and not (isinstance(ac, list) and ac and all(isinstance(m, str) for m in ac)):
            raise ValueError(
                f"train.activation_checkpointing must be true, false or a list of mixer names (got {ac!r}); "
                "e.g. true, or [attention]."
            )
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must be two numbers like [0.9, 0.95] (got {self.betas}).")
        from zoo.train.distributed import check_parallel

        self.parallel = check_parallel(self.parallel)


@dataclass
class TaskConfig:
    """What to train on: a synthetic task generated on the fly, or local text files."""

    name: Literal["mqar", "copying", "selective_copying", "induction", "text"] = "mqar"
    seq_len: int = 64
    vocab_size: int = 8192  # synthetic tasks; text uses the tokenizer's size
    num_kv_pairs: int = 4  # mqar
    num_tokens: int = 16  # copying / selective_copying: tokens to copy
    power_a: float = 0.01  # mqar query-gap distribution p(i) ∝ a·i^(a-1)
    num_train: int = 100_000  # synthetic training examples
    num_test: int = 3_000  # synthetic eval examples
    seed: int = 0  # data generation (train and eval use independent streams of it)
    # text
    path: str | None = None  # a local .json/.jsonl/.csv/.parquet/.txt file (or a folder of them)
    eval_path: str | None = None  # held-out file; None: hold out eval_fraction of the blocks of `path`
    eval_fraction: float = 0.05
    text_column: str = "text"
    tokenizer: str = "byte"  # "byte" (built in) or a local tokenizer folder

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"task.seq_len must be at least 2 (got {self.seq_len}).")
        if self.num_train < 1 or self.num_test < 0:
            raise ValueError(f"task.num_train must be >= 1 and task.num_test >= 0 (got {self.num_train}, {self.num_test}).")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in [0, 1) (got {self.eval_fraction}); e.g. 0.05.")
        if self.name == "mqar":
            from zoo.data.mqar import check_mqar_args

            check_mqar_args(self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a)
        elif self.name == "text" and not self.path:
            raise ValueError("task.path is required for task.name=text; set it to a local .txt/.jsonl/.csv/.parquet file.")
        elif self.name != "text" and self.vocab_size < 3:
            raise ValueError(f"task.vocab_size must be at least 3 for {self.name} (got {self.vocab_size}).")
