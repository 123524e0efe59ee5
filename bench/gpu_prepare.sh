#!/usr/bin/env bash
# Run HERE (the CPU dev machine), once, before a device session: packs what bench/gpu_check.sh
# needs that the GPU image lacks, into two git-ignored folders that the device call carries.
#   .whl/  wheels for Python 3.12 (the GPU image's python3): pydantic (+core, annotated-types,
#          typing-inspection), pydantic-settings (+python-dotenv) and redis-py, at the versions of
#          this repo's .venv, so the worker and the queue client import there.
#   .gpu/  redis-server and the shared libraries it links that a CUDA image may not have, with
#          a wrapper that points the loader at them (bench/gpu_check.sh sets REDIS_SERVER_BIN).
# Then: run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for d in /.whl/ /.gpu/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .whl .gpu
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=()
for name in pydantic pydantic_core pydantic-settings python-dotenv annotated-types \
            typing-inspection redis; do
    PKGS+=("$name==$(ver "$name")")
done
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PKGS[@]}"

REDIS_BIN="$(command -v redis-server)"
cp "$REDIS_BIN" .gpu/redis-server.bin
# every linked library except the C/C++ runtime, which the GPU image has (and must keep its own)
ldd "$REDIS_BIN" | awk '/=> \//{print $3}' \
    | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt)\.so' \
    | xargs -I{} cp -L {} .gpu/
cat > .gpu/redis-server <<'WRAP'
#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
WRAP
chmod +x .gpu/redis-server .gpu/redis-server.bin
du -sh .whl .gpu
ls .whl .gpu
