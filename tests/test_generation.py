"""generate() equals full forwards, step by step, for every causal mixer and the hybrid configs.

Each test compares the per-step logits/scores of ``generate(output_scores=True, return_dict_in_generate=True)``
with the logits of one full forward (no cache) over the final sequence: greedy, beam search (against a manual
beam loop over full forwards), sampling with a fixed seed, chunked prefill, a left-padded batch (also chunked) and a
generation continued from a returned cache. Models are fp32, width 64, untied embeddings, with a sharpened head so greedy
tokens vary instead of repeating one token.
"""

import inspect
import warnings
from functools import cache

import pytest
import torch
from conftest import small_kwargs
from transformers import GenerationMixin

import zoo
from zoo.config import apply_overrides, read_yaml, validate_model
from zoo.models import ZooConfig, ZooForCausalLM

V, D = 101, 64
# Width 64: the mixers' own small settings (test_settings) with wider heads and chunks of 4 (several per prompt).
WIDER = {"mamba2": {"headdim": 16, "chunk_size": 4}, "mom": {"head_dim": 32, "chunk_size": 4}, "retnet": {"chunk_size": 4}}
HYBRIDS = ["samba", "jamba", "mom-attention", "hgrn-swa"]
NEW = 5  # new tokens per generate() call
RTOL = 1e-4  # max |difference| relative to max |logit| of the step
# The name under which the installed transformers passes the cache to generate()/forward and returns it.
CACHE_KEY = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


def causal_mixers() -> list[str]:
    return [n for n in zoo.list_mixers() if zoo.get_mixer(n).causal and zoo.get_mixer(n).has_step]


MODELS = causal_mixers() + HYBRIDS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: intra-op threads only add overhead (several times the CPU time on a shared machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@cache
def build(name: str) -> ZooForCausalLM:
    if name in HYBRIDS:
        data = read_yaml(f"configs/{name}.yaml")
        over = [f"model.vocab_size={V}", f"model.d_model={D}", "model.tie_word_embeddings=false"]
        mixers = data["model"].get("mixers", {})
        if mixers.get("attention", {}).get("window"):
            over.append("model.mixers.attention.window=5")  # generation runs past the window
        if "mom" in mixers:
            over.append("model.mixers.mom.chunk_size=4")
        cfg = validate_model(apply_overrides(data, over)["model"])
    else:
        kwargs = small_kwargs(name, **WIDER.get(name, {}))
        cfg = ZooConfig(vocab_size=V, d_model=D, n_layers=2, pattern=[name], mixers={name: kwargs},
                        tie_word_embeddings=False)
    assert not cfg.tie_word_embeddings
    torch.manual_seed(0)
    model = ZooForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits of order 1-10: distinct greedy tokens, peaked distributions
    return model


def full_logits(model, seqs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(seqs).logits  # (B, T, V), no cache


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    err = float((actual - expected).abs().max() / scale)
    assert err <= RTOL, f"{what}: max relative difference {err:.2e} > {RTOL:g}"


def gen(model, x, **kw):
    kw = {"max_new_tokens": NEW, "min_new_tokens": NEW, "pad_token_id": 0, "output_scores": True,
          "output_logits": True, "return_dict_in_generate": True, **kw}
    with torch.no_grad():
        return model.generate(x, **kw)


def prompts(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, L), generator=g)


def check_steps_against_full_forward(model, out, P: int, *, temperature: float = 1.0) -> None:
    full = full_logits(model, out.sequences)
    assert len(out.scores) == NEW
    for t in range(NEW):
        close(out.logits[t], full[:, P - 1 + t], f"logits of new token {t}")
        close(out.scores[t], full[:, P - 1 + t] / temperature, f"scores of new token {t}")


@pytest.mark.parametrize("name", MODELS)
def test_greedy_scores_equal_full_forward_logits(name):
    model, x = build(name), prompts(2, 7, 1)
    out = gen(model, x, do_sample=False)
    check_steps_against_full_forward(model, out, 7)
    # The comparison has power only if the steps differ: tokens vary and the logits move from step to step.
    assert len(set(out.sequences[:, 7:].flatten().tolist())) >= 2, "tokens degenerate: the test would be weak"
    moved = max(float((out.logits[t] - out.logits[0]).abs().max()) for t in range(1, NEW))
    assert moved > 1e-2 * float(out.logits[0].abs().max()), "logits do not change between steps: the test would be weak"


@pytest.mark.parametrize("name", MODELS)
def test_sampling_scores_equal_full_forward_logits(name):
    model, x = build(name), prompts(2, 6, 2)
    torch.manual_seed(123)
    out = gen(model, x, do_sample=True, top_k=0, top_p=1.0, temperature=0.8)
    check_steps_against_full_forward(model, out, 6, temperature=0.8)


@pytest.mark.parametrize("name", MODELS)
def test_chunked_prefill_scores_equal_full_forward_logits(name):
    model, x = build(name), prompts(1, 11, 3)
    out = gen(model, x, do_sample=False, prefill_chunk_size=4)
    check_steps_against_full_forward(model, out, 11)
    one_shot = gen(model, x, do_sample=False)
    assert torch.equal(out.sequences, one_shot.sequences)


def manual_beam_search(model, prompt: torch.Tensor, num_beams: int, steps: int) -> list[tuple[list[int], float]]:
    """Beam search over full forwards (no cache, no EOS): the ``num_beams`` best continuations by total log-prob."""
    beams = [(prompt.tolist(), 0.0)]
    for _ in range(steps):
        seqs = torch.tensor([b[0] for b in beams])
        logp = torch.log_softmax(full_logits(model, seqs)[:, -1].double(), -1)  # (beams, V)
        total = (torch.tensor([b[1] for b in beams], dtype=torch.float64)[:, None] + logp).flatten()
        top = total.topk(num_beams)
        beams = [(beams[i // V][0] + [i % V], float(s)) for s, i in zip(top.values, top.indices.tolist())]
    return beams


@pytest.mark.parametrize("name", MODELS)
def test_beam_search_equals_manual_beam_loop(name):
    model, x = build(name), prompts(2, 6, 4)
    out = gen(model, x, do_sample=False, num_beams=3, num_return_sequences=3, length_penalty=1.0)
    seqs = out.sequences.view(2, 3, -1)
    # Per step: the scores row of the beam that produced each returned token is the log-softmax of the full forward.
    full = torch.log_softmax(full_logits(model, out.sequences), -1)
    for t in range(NEW):
        rows = out.beam_indices[:, t]
        close(out.scores[t][rows], full[:, 6 - 1 + t], f"beam scores of new token {t}")
    for b in range(2):
        manual = manual_beam_search(model, x[b], 3, NEW)
        assert [s for s, _ in manual] == seqs[b].tolist()
        ref = torch.tensor([score / NEW for _, score in manual], dtype=torch.float32)
        torch.testing.assert_close(out.sequences_scores.view(2, 3)[b], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = build(name)
    a, b = prompts(1, 9, 5), prompts(1, 5, 6)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    out = gen(model, batch, attention_mask=mask, do_sample=False)
    chunked = gen(model, batch, attention_mask=mask, do_sample=False, prefill_chunk_size=3)  # a chunk of pads only
    for row, alone_prompt in ((0, a), (1, b)):
        alone = gen(model, alone_prompt, do_sample=False)
        for o in (out, chunked):
            assert o.sequences[row, 9:].tolist() == alone.sequences[0, alone_prompt.shape[1]:].tolist()
            for t in range(NEW):
                close(o.scores[t][row], alone.scores[t][0], f"row {row}, new token {t} vs the prompt alone")
        check_steps_against_full_forward(model, alone, alone_prompt.shape[1])


@pytest.mark.parametrize("name", MODELS)
def test_generation_continued_from_returned_cache_equals_full_forward(name):
    model, x = build(name), prompts(2, 6, 7)
    first = gen(model, x, do_sample=False)
    cache = first[CACHE_KEY]
    assert cache is not None and cache.get_seq_length() == 6 + NEW - 1
    more = gen(model, first.sequences, do_sample=False, **{CACHE_KEY: cache})
    check_steps_against_full_forward(model, more, 6 + NEW)


@pytest.mark.parametrize("key", ["cache", "past_key_values"])
def test_cache_passed_to_generate_under_either_name_is_used(key):
    model, x = build("samba"), prompts(2, 6, 8)
    first = gen(model, x, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the name the installed transformers calls deprecated
        more = gen(model, first.sequences, do_sample=False, **{key: first[CACHE_KEY]})
    check_steps_against_full_forward(model, more, 6 + NEW)
    with pytest.raises(ValueError, match="pass the cache once"):
        model(x, cache=model.new_cache(), past_key_values=model.new_cache())
