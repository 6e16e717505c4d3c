"""The layout of zoo/kernels: one way to import a kernel, one shape per folder, oracles kept out of production."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import zoo
import zoo.kernels as K

ZOO = Path(zoo.__file__).parent
KERNELS_DIR = ZOO / "kernels"
FOLDERS = sorted(p for p in KERNELS_DIR.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def _import_every_kernel_module() -> None:
    for info in pkgutil.walk_packages(K.__path__, prefix="zoo.kernels."):
        if info.name.endswith(".triton"):  # needs the triton package; the names bound in zoo.kernels must not care
            try:
                importlib.import_module(info.name)
            except ImportError:
                continue
        else:
            importlib.import_module(info.name)


def test_public_names_stay_functions_after_importing_every_submodule():
    _import_every_kernel_module()
    assert set(K.KERNELS) == {"linear_scan", "selective_scan", "selective_state_update", "causal_conv1d",
                              "causal_conv1d_update", "chunk_gla", "chunk_delta_rule", "ssd", "fft_conv"}
    for name, fn in K.KERNELS.items():
        bound = getattr(K, name)
        assert inspect.isfunction(bound) and bound is fn, f"zoo.kernels.{name} is {bound!r}, not the function"
        assert fn.__name__ == name
        assert fn.__module__.count(".") == 2, f"{name} must live in a folder's __init__.py, not in {fn.__module__}"
    folders = {p.name for p in FOLDERS}
    assert not folders & set(K.KERNELS), f"folders named like a public function: {sorted(folders & set(K.KERNELS))}"


def test_every_folder_has_its_reference_and_init():
    assert len(FOLDERS) >= 7
    for folder in FOLDERS:
        for f in ("reference.py", "__init__.py"):
            assert (folder / f).is_file(), f"zoo/kernels/{folder.name}/ has no {f}"
        extra = {p.name for p in folder.glob("*.py")} - {"reference.py", "chunked.py", "triton.py", "__init__.py"}
        assert not extra, f"zoo/kernels/{folder.name}/ has files outside the folder shape: {sorted(extra)}"


def _imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement in ``source`` names (``from a.b import c`` gives a.b and a.b.c);
    ``package`` resolves relative imports."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(p for p in (base, node.module or "") if p)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _package(path: Path) -> str:
    parts = path.relative_to(ZOO.parent).with_suffix("").parts
    return ".".join(parts[:-1])


def test_no_production_module_imports_a_reference():
    offenders = []
    for path in sorted(ZOO.rglob("*.py")):
        if path.name == "reference.py" or {"tests", "benchmarks"} & set(path.relative_to(ZOO).parts):
            continue  # an oracle may use another oracle; tests and benchmarks (timed against it) are not production
        bad = sorted(m for m in _imported_modules(path.read_text(), _package(path)) if m.split(".")[-1] == "reference")
        if bad:
            offenders.append(f"{path.relative_to(ZOO.parent)} imports {', '.join(bad)}")
    assert not offenders, "production code imports an oracle:\n" + "\n".join(offenders)


def test_the_import_scan_sees_every_form_of_a_reference_import():
    """The scan above must be able to fail: each way of importing a reference is caught."""
    for src in ("from zoo.kernels.scan.reference import linear_scan_ref", "from zoo.kernels.scan import reference",
                "import zoo.kernels.gla.reference as r", "from .reference import ssd_ref", "from . import reference",
                "from ..gla.reference import gla_recurrent"):
        found = _imported_modules(src, "zoo.kernels.ssd_scan")
        assert any(m.split(".")[-1] == "reference" and m.startswith("zoo.kernels.") for m in found), (src, found)
    assert not any(m.endswith("reference") for m in _imported_modules("from zoo.kernels import ssd", "zoo.mixers"))
