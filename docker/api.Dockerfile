# syntax=docker/dockerfile:1
# The HTTP front end: validates uploads, queues jobs in Redis, answers with the workers' images.
# CPU-only and torch-free: only the API's own packages (docker/requirements-api.txt) are
# installed, and only the torch-free modules it imports are copied.
#   docker build -f docker/api.Dockerfile -t imgsvc-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt && rm /tmp/requirements-api.txt \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app
# model_zoo: the API reads only manifest.py/config.py/styles.py (torch-free); the shipped manifest and
# the style thumbnails of the web page's gallery come along so the image works without a
# mounted zoo (MODEL_ZOO_DIR overrides). service/ brings the page itself (service/static/).
COPY jobqueue/ jobqueue/
COPY model_zoo/__init__.py model_zoo/config.py model_zoo/manifest.py model_zoo/styles.py \
     model_zoo/manifest.json model_zoo/
COPY model_zoo/thumbnails/ model_zoo/thumbnails/
COPY service/ service/

USER app
ENV HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=3)"]
CMD ["python", "-m", "service"]
