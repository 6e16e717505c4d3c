#!/usr/bin/env python
"""Generate docs/architectures/<mixer>.md (one page per registered mixer) and docs/support.md from the code.

Everything that can be read off the code is: the constructor defaults, the kernels a mixer calls and the
backends those kernels offer, whether decoding and packing work (checked on a tiny model: prefill + step
against the full forward, packed against separate sequences), and ``state_size()`` at a few widths. The
description of what each mixer computes is its module docstring plus its section of ../shared/math.md
(or docs/math.md) when there is one; the paper, that section's heading and the state size in words are the
mixer class's own declarations (``paper``, ``math_section``, ``state_formula``). A new mixer gets a page with no
change here.

    python scripts/gen_arch_docs.py            # rewrites the pages
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zoo  # noqa: E402
from zoo.config import constructor_options  # noqa: E402

WIDTHS = (64, 128, 256)
T_REF = 1024  # attention's state is reported at this many cached tokens


def math_text() -> str:
    for p in (ROOT.parent / "shared" / "math.md", ROOT / "docs" / "math.md"):
        if p.is_file():
            return p.read_text()
    return ""


def math_section(name: str, text: str) -> str:
    head = zoo.get_mixer(name).math_section
    if not head or not text:
        return ""
    lines, out, on = text.splitlines(), [], False
    for line in lines:
        if line.startswith("## "):
            if on:
                break
            on = line.startswith(head)
            if on:
                out.append("### " + line[3:])
                continue
        if on:
            out.append(line)
    return "\n".join(out).strip()


def kernel_backends() -> dict[str, list[str]]:
    """Public kernel function (``zoo.kernels.KERNELS``) -> the backends it offers (``KERNEL_BACKENDS``, the table
    the kernels' dispatch reads)."""
    import zoo.kernels as K
    from zoo.kernels._dispatch import CUDA_PACKAGES, KERNEL_BACKENDS

    out, sources = {}, {}
    for name, fn in K.KERNELS.items():
        path = Path(inspect.getfile(fn))
        src = sources[name] = path.read_text()
        offered = KERNEL_BACKENDS.get(name, ("torch",))  # one-step updates (decode) run in torch
        out[name] = [f"cuda ({CUDA_PACKAGES[name]})" if b == "cuda" else b for b in offered]
    for name, src in sources.items():  # a thin wrapper of another kernel (ssd -> chunk_gla) has its backends
        if out[name] != ["torch"]:
            continue
        for dep in re.findall(r"from zoo\.kernels\.\w+ import (\w+)", src):
            if dep in out and dep != name and out[dep] != ["torch"]:
                out[name] = [b if b == "torch" else f"{b} (via {dep})" for b in out[dep]]
    return out


def kernels_used(cls: type) -> list[str]:
    """Names of the public ``zoo.kernels`` functions a mixer module calls."""
    import zoo.kernels as K

    src = inspect.getsource(sys.modules[cls.__module__])
    names = set()
    for m in re.finditer(r"from zoo\.kernels(?:\.\w+)? import (\([^)]*\)|[^\n]+)", src):
        names.update(n.strip() for n in m.group(1).replace("(", "").replace(")", "").split(","))
    names.update(re.findall(r"\bkernels\.(\w+)\(", src))
    return sorted(n for n in names if n in K.KERNELS)


def tiny_model(name: str, d: int = 64) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=50, d_model=d, n_layers=1, pattern=[name], mlp="none",
                        mixers={"attention": {"n_heads": 4}})
    return zoo.ZooForCausalLM(cfg).eval()


@torch.no_grad()
def check_decode(model) -> bool:
    if not all(b.mixer.has_step for b in model.model.layers):
        return False
    x = torch.randint(0, 50, (1, 10))
    full = model(x).logits
    cache = model.new_cache()
    parts = [model(x[:, :6], past_key_values=cache, use_cache=True).logits]
    parts += [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 10)]
    return torch.allclose(torch.cat(parts, 1), full, rtol=1e-3, atol=1e-4)


@torch.no_grad()
def check_packing(model) -> bool:
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    try:
        out = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 7, 12], dtype=torch.int32)).logits
    except (ValueError, RuntimeError):
        return False
    return torch.allclose(out[:, :7], model(a).logits, rtol=1e-3, atol=1e-4) and torch.allclose(
        out[:, 7:], model(b).logits, rtol=1e-3, atol=1e-4)


def describe(name: str, backends: dict[str, list[str]], math: str) -> tuple[str, dict]:
    cls = zoo.get_mixer(name)
    mod = sys.modules[cls.__module__]
    model = tiny_model(name)
    mixer = model.model.layers[0].mixer
    used = kernels_used(cls)
    info = {
        "causal": bool(mixer.causal), "decode": check_decode(model) if mixer.causal else False,
        "packing": check_packing(model), "kernels": used,
        # the sequence kernels (not the one-token decode updates, which are plain torch) all have Triton
        "triton": bool(used) and all(any(b.startswith("triton") for b in backends.get(k, [])) for k in used
                                     if not k.endswith("_update")),
        "cuda": sorted({b for k in used for b in backends.get(k, []) if b.startswith("cuda")}),
        "lora": _lora_targets(model),
    }
    rows = [f"| `{k}` | `{getattr(t, '__name__', str(t)).replace('typing.', '')}` | `{p.default!r}` |"
            for k, (t, p) in constructor_options(cls).items()]
    sizes = []
    for d in WIDTHS:
        m = tiny_model(name, d).model.layers[0].mixer
        sizes.append((d, m.state_size(T_REF), m))
    formula = cls.state_formula
    src = inspect.getsource(cls.state_size) if "state_size" in cls.__dict__ or any(
        "state_size" in c.__dict__ for c in cls.__mro__[1:-1]) else ""
    expr = re.findall(r"return (.+)", src)
    title, authors, arxiv = cls.paper or (None, None, None)
    lines = [f"# `{name}` — {cls.__name__}", "",
             f"Registry name `{name}`, class `{cls.__module__}.{cls.__qualname__}` "
             f"(`{Path(mod.__file__).relative_to(ROOT)}`). Generated by `scripts/gen_arch_docs.py` from the code.", ""]
    if title:
        lines += [f"**Paper:** {title} — {authors}, [arXiv:{arxiv}](https://arxiv.org/abs/{arxiv}).", ""]
    lines += ["## What it computes", "", inspect.cleandoc(mod.__doc__ or cls.__doc__ or "").strip(), ""]
    if cls.__doc__ and mod.__doc__ and cls.__doc__.strip() not in mod.__doc__:
        lines += [inspect.cleandoc(cls.__doc__), ""]
    sec = math_section(name, math)
    if sec:
        lines += ["From the project's reference sheet (math.md):", "", sec, ""]
    lines += ["## Options and defaults (the YAML schema: `model.mixers." + name + "`)", "",
              "| option | type | default |", "|---|---|---|", *rows, ""]
    lines += ["## State size", ""]
    if formula:
        lines += [f"Per layer and sequence: {formula}.", ""]
    if expr:
        lines += [f"Code (`state_size`): `{expr[-1].strip()}`.", ""]
    lines += ["With the defaults" + (f" (attention at T = {T_REF} cached tokens)" if name == "attention" else "") + ":",
              "", "| d_model | floats per layer |", "|---|---|", *[f"| {d} | {s:,} |" for d, s, _ in sizes], ""]
    lines += ["## Kernels and support", ""]
    if used:
        lines += ["| kernel | backends |", "|---|---|", *[f"| `zoo.kernels.{k}` | {', '.join(backends.get(k, ['torch']))} |"
                                                         for k in used], ""]
    elif name == "attention":
        lines += ["No zoo kernel: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient "
                  "attention on GPU, math kernel on CPU).", ""]
    else:
        lines += ["No zoo kernel: plain torch operations.", ""]
    lines += [f"- causal: {'yes' if info['causal'] else 'no (bidirectional: encoders / classification)'}",
              f"- decoding (O(1) step, checked against the full forward): {'yes' if info['decode'] else 'no'}",
              f"- packing (`cu_seqlens`, checked against separate sequences): {'yes' if info['packing'] else 'no'}",
              "- LoRA targets (`zoo finetune --lora`, default): "
              + ", ".join(f"`{n}`" for n in info["lora"]), ""]
    return "\n".join(lines), info


def _lora_targets(model) -> list[str]:
    from zoo.finetune import default_lora_targets

    return default_lora_targets(model)


def support_page(infos: dict[str, dict], backends: dict[str, list[str]]) -> str:
    lines = ["# What is supported where", "",
             "Generated by `scripts/gen_arch_docs.py` from the code (decoding and packing are checked on a tiny "
             "model each time the page is generated). CPU always runs the pure-torch path. *GPU Triton*: every zoo "
             "kernel the mixer calls has a Triton forward + backward (picked automatically for CUDA tensors); so far "
             "they are verified against the float64 references under `TRITON_INTERPRET=1` on CPU only — no GPU run "
             "has been recorded yet (see docs/benchmarks.md). "
             "*CUDA backend*: the optional `[cuda]` extra packages a kernel can dispatch to with `backend='cuda'`.", "",
             "| mixer | causal | CPU | GPU Triton | CUDA backend | decode | packing (`cu_seqlens`) | kernels |"
             " LoRA default targets |",
             "|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for name, i in infos.items():
        triton = "SDPA (no Triton needed)" if name == "attention" else (
            yes[i["triton"]] if i["kernels"] else "no kernel (torch ops)")
        lines.append(f"| [`{name}`](architectures/{name}.md) | {yes[i['causal']]} | yes | {triton} | "
                     f"{', '.join(i['cuda']) or '—'} | {yes[i['decode']]} | {yes[i['packing']]} | "
                     f"{', '.join(f'`{k}`' for k in i['kernels']) or '—'} | {', '.join(f'`{n}`' for n in i['lora'])} |")
    lines += ["", "Kernels and their backends:", "", "| kernel | backends |", "|---|---|"]
    lines += [f"| `zoo.kernels.{k}` | {', '.join(v)} |" for k, v in sorted(backends.items())]
    lines += ["", "Fine-tuning (`zoo finetune`) works for every mixer; `--pack` needs packing support, "
              "generation (`generate()`, lm-eval `generate_until`) needs decode support.", ""]
    lines += versions_section()
    return "\n".join(lines)


def _compat_pins() -> dict[str, str]:
    """The oldest supported versions: the ``COMPAT_PINS`` that ``make test-compat`` installs."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^COMPAT_PINS\s*\?=\s*(.+)$", text, re.M)
    return dict(pin.split("==") for pin in m.group(1).split()) if m else {}


def versions_section() -> list[str]:
    """Which versions the tests run on: the newest pip resolves (``make test``) and the oldest (``make test-compat``)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from versions import versions

    have, oldest = versions(), _compat_pins()
    deps = re.findall(r'^\s*"((?:torch|triton|transformers)[^";]*)', (ROOT / "pyproject.toml").read_text(), re.M)
    lines = ["## Versions tested", "",
             f"Declared range (pyproject.toml): {', '.join(f'`{d}`' for d in deps)}. CI runs `make test` on the newest "
             "releases pip resolves that day (no pins but torch's CPU build), so an upstream change shows as a red CI, "
             "and `make test-compat` runs the generation, cache, packing, fresh-loading and kernel tests on the oldest "
             "supported versions. torch is tested at 2.13 only (the CPU build these machines install).", "",
             "| package | newest tested (`make test`, this page's generation) | oldest tested (`make test-compat`) |",
             "|---|---|---|"]
    for name in ("torch", "triton", "transformers", "datasets", "numpy"):
        lines.append(f"| {name} | {have.get(name, '-')} | {oldest.get(name, have.get(name, '-'))} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="docs folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "architectures").mkdir(parents=True, exist_ok=True)
    backends, math = kernel_backends(), math_text()
    infos = {}
    for name in zoo.list_mixers():
        page, infos[name] = describe(name, backends, math)
        tmp = out / "architectures" / f".{name}.md.tmp"
        tmp.write_text(page)
        os.replace(tmp, out / "architectures" / f"{name}.md")
        print(f"{name}: {infos[name]}")
    tmp = out / ".support.md.tmp"
    tmp.write_text(support_page(infos, backends))
    os.replace(tmp, out / "support.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
