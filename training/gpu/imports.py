"""Which packages the GPU machine has, which must travel as wheels, and the proof that the
campaign imports nothing else.

The GPU image's python3 (3.12) has a fixed set of packages (:data:`PREINSTALLED`, copied from
the device tool's KINDS.md as read on 2026-11-17) and nothing can be installed there from a
registry. Whatever else the repository imports travels as wheels in ``.whl/``
(:data:`WHEELS`; ``bench/gpu_prepare.sh`` downloads exactly these, at this venv's versions:
``python -m training.gpu.imports wheels``). A missing package would cost a whole lease, so the
rehearsal runs the campaign under :func:`audited` (``python training/gpu/imports.py OUT.json -m
MODULE ARGS...``), which records every import *made by the repository's own modules*, and the
test fails if any of them is neither the standard library, the repository, preinstalled, nor a
wheel. Only the repository's own imports count: what torch or matplotlib import for themselves
on this machine (optional accelerators, say) is their business and differs between versions.

This file runs as a script before anything else is imported, so it uses the standard library
alone.
"""

from __future__ import annotations

import builtins
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
REPO_PACKAGES = frozenset(
    {"training", "model_zoo", "evaluation", "worker", "service", "jobqueue", "bench",
     "imgsvc_client", "scripts", "tests"}
)  # fmt: skip

# KINDS.md, "Python packages already there" (nvidia-h200, image 'cuda', read 2026-11-17),
# verbatim, so a new reading can be pasted over it.
_KINDS_MD_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp"""
PREINSTALLED = frozenset(_KINDS_MD_PACKAGES.split())

WHEELS: dict[str, str] = {
    # what the campaign needs: model_zoo's configs and manifest are pydantic models
    "pydantic": "campaign",
    "pydantic-core": "campaign",
    "annotated-types": "campaign",
    "typing-inspection": "campaign",
    # what the serving check (bench/gpu_check.sh) needs besides: the worker's settings, Redis
    "pydantic-settings": "gpu_check",
    "python-dotenv": "gpu_check",
    "redis": "gpu_check",
    # the serving check's end-to-end run (the API process): small pure-Python wheels
    "fastapi": "gpu_check",
    "starlette": "gpu_check",
    "uvicorn": "gpu_check",
    # service.server subclasses uvicorn's httptools protocol: uvicorn imports it, not our code,
    # so the import audit cannot see it (the 2026-12-04 lease's API died on it)
    "httptools": "gpu_check",
    "python-multipart": "gpu_check",
    "opentelemetry-api": "gpu_check",
    "fastapi-offline": "gpu_check",
    # JSON log lines of the worker and the API (jobqueue.telemetry)
    "python-json-logger": "gpu_check",
}
"""Packages that travel as wheels (``.whl/``), and which command needs them."""


GPU_ENVIRONMENT = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
"""The GPU image's Python (KINDS.md: 3.12.3), for the wheels' dependency markers."""


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form (``Pydantic_Core`` -> ``pydantic-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide top-level module ``module`` (here, in this
    venv), normalised; empty for the standard library or an unknown module."""
    from importlib.metadata import packages_distributions

    mapping = packages_distributions()
    return sorted({normalise(d) for d in mapping.get(module, [])})


def forbidden(modules: Iterable[str]) -> dict[str, list[str]]:
    """The top-level modules that would be missing on the GPU machine, with the distributions
    that provide them here: not the standard library, not the repository, and provided by no
    preinstalled package and no wheel."""
    allowed = PREINSTALLED | set(WHEELS)
    out: dict[str, list[str]] = {}
    for module in sorted(set(modules)):
        if module in sys.stdlib_module_names or module in REPO_PACKAGES or module == "__main__":
            continue
        dists = distributions_of(module)
        if not dists or not set(dists) & allowed:
            out[module] = dists
    return out


def wheel_requirements() -> list[str]:
    """``name==version`` of every wheel at this venv's version (what gpu_prepare downloads)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in WHEELS]


def missing_requirements() -> dict[str, list[str]]:
    """Each wheel's own unconditional requirements that are neither preinstalled nor wheels
    (``--no-deps`` installs: a dependency nobody carries would fail at import there)."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    allowed = PREINSTALLED | set(WHEELS)
    out: dict[str, list[str]] = {}
    for name in WHEELS:
        for line in requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(GPU_ENVIRONMENT):
                continue  # an extra, or for another Python than the GPU image's
            if normalise(requirement.name) not in allowed:
                out.setdefault(name, []).append(normalise(requirement.name))
    return out


# ---------------------------------------------------------------------------------- the audit


class _Recorder:
    """Wraps ``builtins.__import__``: for every absolute import whose importing module belongs
    to the repository, remember the imported top-level name."""

    def __init__(self) -> None:
        self.by_importer: dict[str, set[str]] = {}
        self._original = builtins.__import__

    def __call__(
        self,
        name: str,
        globals: dict[str, Any] | None = None,  # __import__'s own signature
        locals: dict[str, Any] | None = None,
        fromlist: tuple[str, ...] = (),
        level: int = 0,
    ) -> Any:
        importer = (globals or {}).get("__name__") or ""
        top = importer.split(".")[0]
        if level == 0 and (top in REPO_PACKAGES or importer == "__main__"):
            self.by_importer.setdefault(importer, set()).add(name.split(".")[0])
        return self._original(name, globals, locals, fromlist, level)

    def report(self) -> dict[str, Any]:
        imported = sorted({m for names in self.by_importer.values() for m in names})
        return {
            "python": sys.version.split()[0],
            "imported_by_repo": imported,
            "by_importer": {k: sorted(v) for k, v in sorted(self.by_importer.items())},
            "loaded_top_level": sorted({m.split(".")[0] for m in list(sys.modules)}),
        }


def audited(report: Path, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in this process with the import recorder installed; the
    record is written to ``report`` when the run ends, however it ends."""
    import runpy

    recorder = _Recorder()
    builtins.__import__ = recorder  # type: ignore[assignment]
    sys.argv = [module, *args]
    sys.path[0] = str(REPO)  # not this script's folder: the repository, as with -m
    status: int | str | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code
    finally:
        builtins.__import__ = recorder._original
        data = recorder.report()
        report.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(report.read_text()) if report.exists() else {"runs": []}
        previous["runs"].append({"module": module, "args": args, "status": status, **data})
        report.write_text(json.dumps(previous, indent=1) + "\n")
    return status if isinstance(status, int) else (0 if status is None else 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["wheels"]:
        print("\n".join(wheel_requirements()))
        return 0
    if argv[:1] == ["check"]:  # python -m training.gpu.imports check REPORT.json
        runs = json.loads(Path(argv[1]).read_text())["runs"]
        bad = forbidden(m for run in runs for m in run["imported_by_repo"])
        unmet = missing_requirements()
        for module, dists in bad.items():
            print(f"missing on the GPU machine: {module} (here from {dists or 'nowhere'})")
        for wheel, needs in unmet.items():
            print(f"wheel {wheel} needs {needs}: neither preinstalled nor carried")
        return 1 if bad or unmet else 0
    if len(argv) >= 3 and argv[1] == "-m":  # python training/gpu/imports.py REPORT -m MOD ARGS
        return audited(Path(argv[0]), argv[2], argv[3:])
    print(
        "usage: imports.py wheels | check REPORT.json | REPORT.json -m MODULE [ARGS...]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
