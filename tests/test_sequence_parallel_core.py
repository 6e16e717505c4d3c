"""The sequence-parallel building blocks (zoo.parallel.sequence) on 2 and 4 gloo processes: exact vs one process."""

from __future__ import annotations

import pytest
import torch
from sp_harness import run_ranks

CASES = [
    ("sp_jobs_core:scan_job", {"B": 2, "L": 16, "D": 3}),
    ("sp_jobs_core:scan_job", {"B": 2, "L": 16, "D": 3, "reverse": True}),
    # boundaries inside a slice, exactly on slice edges (4, 8, 12) and an empty document
    ("sp_jobs_core:scan_job", {"B": 1, "L": 16, "D": 3, "cu": [0, 3, 8, 8, 13, 16]}),
    ("sp_jobs_core:scan_job", {"B": 1, "L": 16, "D": 3, "cu": [0, 4, 10, 16], "reverse": True}),
    ("sp_jobs_core:scan_job", {"B": 1, "L": 16, "D": 3, "cu": [0, 16]}),
    ("sp_jobs_core:conv_job", {"E": 3, "L": 16, "W": 4}),
    ("sp_jobs_core:conv_job", {"E": 3, "L": 16, "W": 4, "cu": [0, 3, 5, 8, 13, 16]}),
    ("sp_jobs_core:conv_job", {"E": 3, "L": 16, "W": 4, "cu": [0, 7, 9, 16]}),
]


@pytest.mark.parametrize("world", [2, 4])
def test_core_blocks_match_one_process(world, tmp_path):
    results = run_ranks(CASES, world=world, tmp=tmp_path, timeout=120)
    for (job, kw), per_rank in zip(CASES, results):
        for rank, res in enumerate(per_rank):
            for key in res:
                if key.endswith("_ref"):
                    continue
                torch.testing.assert_close(res[key], res[key + "_ref"], rtol=1e-10, atol=1e-10,
                                           msg=f"{job} {kw} rank {rank}/{world} {key}")


# Packings: boundaries inside slices, on slice edges (4, 8, 12), an empty document, one document across every rank.
PACKINGS = [[0, 3, 8, 8, 13, 16], [0, 4, 10, 16], [0, 2, 15, 16]]
ROUTED = [
    *[("sp_jobs_core:selective_job", {"L": 16, "cu": cu}) for cu in (None, *PACKINGS)],
    ("sp_jobs_core:selective_job", {"L": 16, "groups": 1}),
    *[("sp_jobs_core:gla_job", {"L": 16, "cu": cu}) for cu in (None, *PACKINGS)],
    ("sp_jobs_core:gla_job", {"L": 16, "per_key": True}),
    ("sp_jobs_core:gla_job", {"L": 16, "per_key": True, "cu": PACKINGS[0]}),
    ("sp_jobs_core:ssd_job", {"L": 16}),
    ("sp_jobs_core:ssd_job", {"L": 16, "cu": PACKINGS[2]}),
    *[("sp_jobs_core:delta_job", {"L": 16, "cu": cu}) for cu in (None, *PACKINGS)],
    ("sp_jobs_core:delta_job", {"L": 16, "gated": False}),
    ("sp_jobs_core:delta_job", {"L": 16, "gated": False, "cu": PACKINGS[1]}),
    *[("sp_jobs_core:conv_routed_job", {"L": 16, "cu": cu}) for cu in (None, *PACKINGS)],
    ("sp_jobs_core:conv_routed_job", {"L": 16, "W": 2, "cu": PACKINGS[0]}),
]


@pytest.mark.parametrize("world", [2, 4])
def test_routed_kernels_match_one_process(world, tmp_path):
    """selective_scan, chunk_gla (and ssd through it), chunk_delta_rule and causal_conv1d called under
    ``sequence_parallel``: outputs and the gradients of every input (weights summed over the group) equal one process."""
    results = run_ranks(ROUTED, world=world, tmp=tmp_path, timeout=150)
    for (job, kw), per_rank in zip(ROUTED, results):
        for rank, res in enumerate(per_rank):
            for key in res:
                if not key.endswith("_ref"):
                    torch.testing.assert_close(res[key], res[key + "_ref"], rtol=1e-10, atol=1e-10,
                                               msg=f"{job} {kw} rank {rank}/{world} {key}")
