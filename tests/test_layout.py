"""The layout is the architecture: the serving path never imports training or evaluation code.

The worker image ships ``model_zoo``, ``worker`` and ``jobqueue`` only; an import of the trainer,
the VGG loss network or the evaluation code from there would break it (and load ~60 MB of
weights nobody serves with).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVING_PACKAGES = ("model_zoo", "worker", "service", "jobqueue")
OFFLINE_PACKAGES = ("training", "evaluation", "bench")


def _imported_names(path: Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` in the file names, lazy ones included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", SERVING_PACKAGES)
def test_serving_code_imports_no_offline_package(package: str) -> None:
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / package).rglob("*.py")
        for name in _imported_names(path)
        if name.split(".")[0] in OFFLINE_PACKAGES
    }
    assert not offenders, f"serving code imports offline code: {sorted(offenders)}"


def test_worker_process_loads_no_training_or_evaluation_module() -> None:
    """What the worker and API processes import at start, transitively."""
    code = (
        "import json, sys\n"
        "import worker.main, worker.engine, service.app, service.launch\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert "worker.engine" in loaded  # the probe imported what it claims
    offline = [m for m in loaded if m.split(".")[0] in OFFLINE_PACKAGES]
    assert offline == []
    assert not [m for m in loaded if m.startswith(("torchvision", "matplotlib", "scipy"))]


def test_the_torch_free_api_stays_torch_free() -> None:
    code = "import json, sys\nimport service.app\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "torch" not in json.loads(out)


def test_model_zoo_holds_only_what_serving_loads() -> None:
    modules = sorted(p.stem for p in (ROOT / "model_zoo").glob("*.py"))
    assert modules == [
        "__init__",
        "config",
        "hardware",
        "imaging",
        "manifest",
        "nets",
        "reference",
        "registry",
        "styles",
    ]


def _layout_table() -> dict[str, str]:
    """The README's layout table: first-column paths -> their description."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            first, description = line[2:].split(" | ", 1)
            for path in re.findall(r"`([^`]+)`", first):
                rows[path.rstrip("/")] = description
    return rows


def test_readme_layout_table_matches_the_tree() -> None:
    rows = _layout_table()
    for path in rows:
        assert (ROOT / path).exists(), f"README layout names {path}, which is not in the tree"
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"} | {
        "tests"
    }
    assert packages <= set(rows), f"packages missing from the README layout: {packages - set(rows)}"
    # every module of the serving, training and evaluation packages is named in its row
    for package in ("model_zoo", "training", "evaluation", "worker", "jobqueue", "service"):
        described = rows[package]
        for module in (ROOT / package).glob("*.py"):
            if module.stem in ("__init__", "__main__", "cli"):
                continue
            assert f"`{module.name}`" in described or f"`{module.stem}" in described, (
                f"README layout does not describe {package}/{module.name}"
            )
