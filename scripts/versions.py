"""Print the versions of the packages the tests run on (first lines of `make test`'s log)."""

from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = ("torch", "triton", "transformers", "datasets", "safetensors", "accelerate", "peft", "lm_eval", "numpy")


def versions() -> dict[str, str]:
    """Installed version of each package the project depends on ("-" when absent)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


if __name__ == "__main__":
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
