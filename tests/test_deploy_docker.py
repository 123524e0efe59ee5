"""The Dockerfiles, checked without a Docker engine: what they copy exists and is not excluded
by .dockerignore, the API image holds everything the API imports and no torch, every image (the
model zoo's included) runs as a non-root user, and the API's pinned requirements agree with
pyproject.toml."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import json
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "api": REPO / "docker/api.Dockerfile",
    "worker": REPO / "docker/worker.Dockerfile",
    # the model zoo's own image, for Kubernetes (deploy/k8s): checked like the others
    "zoo": REPO / "docker/zoo.Dockerfile",
}
API_REQUIREMENTS = REPO / "docker/requirements-api.txt"


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def copy_sources(instruction: Instruction) -> list[str]:
    args = instruction.args
    if args.startswith("["):
        parts = json.loads(args)
    else:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
    assert len(parts) >= 2, instruction
    return parts[:-1]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: a path is out if it or a parent matches."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(
                prefix, pattern.removeprefix("**/")
            ):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(
                Path(prefix).name, pattern.removeprefix("**/")
            ):
                return True
    return False


def image_files(name: str) -> list[str]:
    return [
        src.rstrip("/")
        for ins in parse_dockerfile(DOCKERFILES[name])
        if ins.keyword in ("COPY", "ADD") and "--from" not in ins.args
        for src in copy_sources(ins)
    ]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(name: str) -> None:
    sources = image_files(name)
    assert sources, "nothing copied?"
    patterns = dockerignore_patterns()
    for src in sources:
        assert (REPO / src).exists(), f"{DOCKERFILES[name].name} copies missing {src}"
        assert not ignored(src, patterns), f"{src} is excluded by .dockerignore"


def test_dockerignore_keeps_heavy_and_secret_paths_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", ".env", "runs/mosaic/ckpt.pt", "tests/x.py"):
        assert ignored(path, patterns), path
    for path in ("service/app.py", "model_zoo/weights/x4.safetensors", "pyproject.toml"):
        assert not ignored(path, patterns), path


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_run_as_a_non_root_user(name: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[name])
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, ins in enumerate(instructions) if ins.keyword == "USER")
    assert all(ins.keyword != "RUN" for ins in instructions[last_user:])  # no root RUN after it


def test_base_images_and_commands() -> None:
    api = parse_dockerfile(DOCKERFILES["api"])
    worker = parse_dockerfile(DOCKERFILES["worker"])
    assert [i.args for i in api if i.keyword == "FROM"] == ["python:3.11-slim"]
    worker_base = [i.args for i in worker if i.keyword == "FROM"]
    assert len(worker_base) == 1 and worker_base[0].startswith("nvidia/cuda:")
    assert "runtime" in worker_base[0]
    assert any("python3.11" in i.args for i in worker if i.keyword == "RUN")
    assert json.loads(next(i.args for i in api if i.keyword == "CMD")) == [
        "python", "-m", "service",
    ]  # fmt: skip
    assert json.loads(next(i.args for i in worker if i.keyword == "CMD")) == [
        "python", "-m", "worker",
    ]  # fmt: skip
    assert "torch" not in DOCKERFILES["api"].read_text().replace("torch-free", "")


def repo_files_imported_by(modules: str) -> tuple[list[str], bool]:
    """Repository files a process imports after ``import <modules>``, and whether torch is
    among its modules; found by importing in a fresh interpreter."""
    code = (
        f"import json, sys, {modules}\n"
        f"root = {str(REPO)!r}\n"
        "files = sorted({m.__file__ for m in list(sys.modules.values())\n"
        "    if getattr(m, '__file__', None) and m.__file__.startswith(root + '/')\n"
        "    and '/.venv/' not in m.__file__})\n"
        "print(json.dumps([f[len(root) + 1:] for f in files]))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    files_line, torch_line = out.stdout.strip().splitlines()
    return json.loads(files_line), torch_line == "True"


def api_module_files() -> list[str]:
    files, torch_loaded = repo_files_imported_by("service.app, service.__main__, service.launch")
    assert not torch_loaded, "the API imports torch"
    return files


def test_api_image_holds_every_module_the_api_imports() -> None:
    copied = image_files("api")
    modules = api_module_files()
    assert "service/app.py" in modules and "jobqueue/protocol.py" in modules
    for module in modules:
        assert any(module == src or module.startswith(src + "/") for src in copied), (
            f"the API imports {module}, which api.Dockerfile does not copy"
        )


def test_worker_image_holds_every_module_the_worker_imports() -> None:
    copied = image_files("worker")
    modules, torch_loaded = repo_files_imported_by("worker.main")
    assert torch_loaded and "worker/engine.py" in modules
    for module in modules:
        assert any(module == src or module.startswith(src + "/") for src in copied), (
            f"the worker imports {module}, which worker.Dockerfile does not copy"
        )


def third_party_imports(files: list[str]) -> set[str]:
    local = {Path(f).parts[0] for f in files}
    names: set[str] = set()
    for file in files:
        tree = ast.parse((REPO / file).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def pinned_api_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in API_REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def test_api_requirements_cover_its_imports_and_match_pyproject() -> None:
    reqs = pinned_api_requirements()
    assert "torch" not in reqs and "torchvision" not in reqs
    distributions = importlib.metadata.packages_distributions()
    for module in third_party_imports(api_module_files()):
        dists = {canonicalize_name(d) for d in distributions.get(module, [module])}
        assert dists & set(reqs), f"the API imports {module} ({dists}); not in {API_REQUIREMENTS}"

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        canonicalize_name(Requirement(d).name): Requirement(d) for d in project["dependencies"]
    }
    for name, req in reqs.items():
        pins = [s.version for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"{name} is not pinned with =="
        if name in declared:  # transitive pins (starlette) are fine; direct ones must agree
            assert declared[name].specifier.contains(pins[0]), (
                f"{name}=={pins[0]} violates pyproject's {declared[name].specifier}"
            )
            assert req.extras == declared[name].extras, name
        else:
            assert name == "starlette", f"{name} is pinned for the API but not a dependency"
        installed = importlib.metadata.version(name)
        assert installed == pins[0], f"tests run {name} {installed}, the image pins {pins[0]}"
