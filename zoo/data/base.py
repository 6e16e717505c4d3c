"""The dataset type every task returns: fixed-length ``input_ids`` / ``labels`` tensors in the HF convention."""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


class TokenDataset(torch.utils.data.Dataset):
    """``N`` examples of length ``L``: ``input_ids`` and ``labels`` (HF convention, ``-100`` = ignored).

    Labels are aligned with the inputs; the model shifts them, so ``logits[:, t]`` is scored against
    ``labels[:, t + 1]``. Indexing with an int gives a dict of 1-D tensors; :meth:`batch` gathers many rows at once.
    """

    def __init__(self, input_ids: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if input_ids.shape != labels.shape or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} must both be (N, L); "
                "build them with the same shape."
            )
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        """Length ``L`` of every example."""
        return self.input_ids.shape[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``index`` as ``(input_ids, labels)``, each ``(len(index), L)``."""
        return self.input_ids[index], self.labels[index]
