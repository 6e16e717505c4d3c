"""A whole model sequence-parallel on 2 and 4 gloo processes equals one process: logits, loss, every gradient.

The mixers covered here are those whose sequence-parallel path has landed; tests/test_sequence_parallel.py holds
the per-architecture matrix. Each mixer must see only L / P tokens per rank (no full-length activations).
"""

from __future__ import annotations

import pytest
import torch
from sp_harness import run_ranks

VOCAB, D, L = 32, 32, 16


def _model(pattern, mixers) -> dict:
    return {"vocab_size": VOCAB, "d_model": D, "n_layers": len(pattern), "pattern": pattern, "mixers": mixers,
            "mlp": "swiglu", "tie_word_embeddings": False}


def check(results, jobs, world, rtol=1e-5, atol=1e-6):
    for (_job, kw), per_rank in zip(jobs, results):
        for rank, res in enumerate(per_rank):
            assert (res["seen"] == L // world).all(), f"{kw} rank {rank}: mixers saw lengths {res['seen'].tolist()}"
            for key in res:
                if key.endswith("_ref") or key == "seen":
                    continue
                torch.testing.assert_close(res[key], res[key + "_ref"], rtol=rtol, atol=atol,
                                           msg=f"{kw.get('cu')} rank {rank}/{world} {key}")


@pytest.mark.parametrize("world", [2, 4])
def test_mingru_model_is_exact(world, tmp_path):
    """The model plumbing (embedding, norms, MLPs, the loss across slice edges) around minGRU's linear_scan."""
    model = _model(["mingru"], {})
    jobs = [("sp_jobs_model:model_job", {"model": model, "L": L}),
            ("sp_jobs_model:model_job", {"model": model, "L": L, "cu": [0, 5, 8, 8, 13, 16]}),
            ("sp_jobs_model:model_job", {"model": model, "L": L, "cu": [0, 4, 16], "tiled": True})]
    check(run_ranks(jobs, world=world, tmp=tmp_path, timeout=120), jobs, world)
