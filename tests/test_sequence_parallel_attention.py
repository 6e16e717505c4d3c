"""Softmax attention, S4 and Hydra sequence-parallel on 2 and 4 gloo processes equal one process.

Each case is a whole model (embedding, the mixer, MLP, the loss across slice edges) split over the group vs the
same model in one process: logits, loss and every parameter gradient (fp32, relative 1e-5), unpacked and packed
(document boundaries inside, on and across slice edges, an empty document), and every mixer saw only L / P tokens.
All cases of one group size run in one launch of the ranks (see tests/sp_harness.py).
"""

from __future__ import annotations

import pytest
from sp_harness import run_ranks
from test_sequence_parallel_model import L, _model, check

import zoo

PACKINGS = [None, [0, 3, 8, 8, 13, 16], [0, 4, 16]]
CASES = {
    "attention_allgather_gqa": {"attention": {"n_heads": 4, "n_kv_heads": 2, "sp": "allgather"}},
    "attention_ulysses_gqa": {"attention": {"n_heads": 8, "n_kv_heads": 4, "sp": "ulysses"}},
    "attention_sliding_window": {"attention": {"n_heads": 4, "window": 6}},  # 5 keys before: spans 2 ranks at P=4
    "attention_bidirectional": {"attention": {"n_heads": 4, "causal": False}},
    "s4_causal": {"s4": {"d_state": 16}},
    "s4_bidirectional": {"s4": {"d_state": 16, "bidirectional": True}},
    "s4_dplr": {"s4": {"d_state": 16, "mode": "dplr"}},  # dense N x N transitions (LASP-2 with matrices)
    "hydra": {"hydra": {"d_state": 16, "headdim": 8, "chunk_size": 8, "d_conv": 7}},  # conv halo of 3 per side
}
REFUSALS = {
    "ulysses_heads": ({"attention": {"n_heads": 4, "n_kv_heads": 1, "sp": "ulysses"}}, "must both be divisible by 2"),
    "s4_dplr_bidirectional": ({"s4": {"d_state": 16, "mode": "dplr", "bidirectional": True}}, "set mode: s4d"),
}


#: one layer per model at P = 2, B = 2, d_model 32: (mixers, kind, elements each rank receives, collectives)
COMM = {
    "ulysses": ({"attention": {"n_heads": 4, "sp": "ulysses"}}, "all_to_all", 4 * 2 * L * 32 // 2, 4),  # 4·B·L·D/P
    "allgather": ({"attention": {"n_heads": 4}}, "kv", 2 * 2 * L * 32, 2),  # 2·B·L·Hkv·K: K and V
    "s4_state": ({"s4": {"d_state": 16}}, "lasp_state", 2 * 2 * 32 * 8, 1),  # P·B·H·N/2 complex modes
}


def _jobs():
    jobs = []
    for name, mixers in CASES.items():
        for cu in PACKINGS:
            kw = {"model": _model([next(iter(mixers))], mixers), "L": L}
            jobs.append((name, ("sp_jobs_model:model_job", kw if cu is None else {**kw, "cu": cu})))
    return jobs


_RESULTS: dict[int, dict[str, list]] = {}


def _results(world: int, tmp_path_factory) -> dict[str, list]:
    """Every case's (job, per-rank results) at ``world`` ranks; one launch per group size, shared by the tests."""
    if world not in _RESULTS:
        named = _jobs()
        refusals = [("sp_jobs_attention:refusal_job", {"model": _model([next(iter(m))], m), "L": L})
                    for m, _ in REFUSALS.values()] if world == 2 else []
        comm = [("sp_jobs_attention:comm_job", {"model": _model([next(iter(m))], m), "L": L})
                for m, *_ in COMM.values()] if world == 2 else []
        jobs = [j for _, j in named] + refusals + comm
        res = run_ranks(jobs, world=world, tmp=tmp_path_factory.mktemp(f"sp{world}"), timeout=240)
        out: dict[str, list] = {}
        for (name, job), r in zip(named, res):
            out.setdefault(name, []).append((job, r))
        for name, r in zip(REFUSALS, res[len(named):]):
            out[f"refusal:{name}"] = r
        for name, r in zip(COMM, res[len(named) + len(refusals):]):
            out[f"comm:{name}"] = r
        _RESULTS[world] = out
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_model_is_exact(case, world, tmp_path_factory):
    """Outputs, loss and all gradients equal one process, packed or not; each mixer sees L / P tokens."""
    pairs = _results(world, tmp_path_factory)[case]
    check([r for _, r in pairs], [j for j, _ in pairs], world)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_impossible_settings_are_refused(name, tmp_path_factory):
    """Every rank refuses with the same one-sentence error, before any collective (no hang)."""
    per_rank = _results(2, tmp_path_factory)[f"refusal:{name}"]
    assert all(REFUSALS[name][1] in r["error"] for r in per_rank), [r["error"] for r in per_rank]


@pytest.mark.parametrize("name", list(COMM))
def test_communication_matches_the_formula(name, tmp_path_factory):
    """What the benchmark counts: Ulysses moves 4·B·L·D/P per layer, LASP-2 P states, independent of anything else."""
    _, kind, elements, calls = COMM[name]
    for counts in _results(2, tmp_path_factory)[f"comm:{name}"]:
        assert (int(counts[kind][0]), int(counts[kind][2])) == (elements, calls), counts


def test_ring_is_refused_at_construction():
    with pytest.raises(ValueError, match="use sp: allgather or sp: ulysses"):
        zoo.build_model(_model(["attention"], {"attention": {"n_heads": 4, "sp": "ring"}}))
