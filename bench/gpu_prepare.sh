#!/usr/bin/env bash
# Run HERE (the CPU dev machine), once, before a device session: packs what bench/gpu_check.sh
# and scripts/gpu_campaign.sh need that the GPU image lacks, into two git-ignored folders that
# the device call carries (scripts/gpu_prepare.sh runs this, then builds the data pack).
#   .whl/  wheels for Python 3.12 (the GPU image's python3): pydantic (+core, annotated-types,
#          typing-inspection) for the campaign and the worker; pydantic-settings (+python-dotenv),
#          redis-py, python-json-logger, and fastapi (+ fastapi-offline), starlette, uvicorn,
#          python-multipart, opentelemetry-api for the serving check's end-to-end run; at the
#          versions of this repo's .venv.
#   .gpu/  redis.tar.xz: redis-server and the shared libraries it links that a CUDA image may
#          not have, with a wrapper that points the loader at them (bench/gpu_check.sh unpacks
#          it and sets REDIS_SERVER_BIN).
# Then: run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# .whl/ and .gpu/ are in .gitignore: ignored, so they travel only when a call carries them.
mkdir -p .whl
# The list is training/gpu/imports.py's WHEELS (the campaign's rehearsal checks its imports
# against it), at this venv's versions.
mapfile -t PKGS < <("$PY" training/gpu/imports.py wheels)
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PKGS[@]}"

# redis-server and the shared libraries it links, xz-compressed (11.7 MiB -> ~4): the lease's
# one call carries .gpu beside the data pack, and every MiB there is a MiB less of photos.
# bench/gpu_check.sh unpacks it with Python's tarfile (the GPU image need not have xz).
REDIS_BIN="$(command -v redis-server)"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$REDIS_BIN" "$stage/redis-server.bin"
# every linked library except the C/C++ runtime, which the GPU image has (and must keep its own)
ldd "$REDIS_BIN" | awk '/=> \//{print $3}' \
    | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|libpthread|libdl|librt)\.so' \
    | xargs -I{} cp -L {} "$stage/"
cat > "$stage/redis-server" <<'WRAP'
#!/usr/bin/env bash
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
WRAP
chmod +x "$stage/redis-server" "$stage/redis-server.bin"
rm -rf .gpu && mkdir .gpu
"$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'w:xz').add(sys.argv[2], arcname='.')" \
    .gpu/redis.tar.xz "$stage"
du -sh .whl .gpu
ls .whl .gpu
