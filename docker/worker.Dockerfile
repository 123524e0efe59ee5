# syntax=docker/dockerfile:1
# The batching inference worker (python -m worker), for NVIDIA GPUs (CPU works too).
# The torch wheel from PyPI carries its own CUDA libraries; the CUDA runtime base provides the
# matching user-space environment and the host needs only the NVIDIA driver + container toolkit.
#   docker build -f docker/worker.Dockerfile -t imgsvc-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin app

# The project's pinned dependencies (torch==2.14.1 among them) straight from pyproject.toml,
# so the worker image and `make run` can never disagree on versions.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt /tmp/pyproject.toml

WORKDIR /app
COPY jobqueue/ jobqueue/
COPY model_zoo/ model_zoo/
COPY worker/ worker/

USER app
ENV HOME=/home/app \
    DEVICE=auto \
    PRECISION=auto
# SIGTERM: the worker finishes the batch in flight and stops taking jobs (compose gives it
# stop_grace_period to do so).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "worker"]
