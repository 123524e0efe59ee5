# syntax=docker/dockerfile:1
# The model zoo as an image of its own, for Kubernetes (deploy/k8s): an init container copies
# /zoo into the pod's zoo volume, which the API and the worker mount read-only at
# MODEL_ZOO_DIR. Models then ship without rebuilding the code images (the worker's is ~5 GB of
# CUDA and torch; this one is the weights, under 4 MB), and a new zoo is a new tag rolled out like
# any image: README, "Kubernetes".
#   docker build -f docker/zoo.Dockerfile -t imgsvc-zoo:2026-11-30 .
FROM busybox:1.36.1

COPY model_zoo/manifest.json /zoo/manifest.json
COPY model_zoo/weights/ /zoo/weights/
COPY model_zoo/thumbnails/ /zoo/thumbnails/

# the same non-root user as the API and worker images (the pods run as 10001)
USER 10001:10001
CMD ["cp", "-R", "/zoo/.", "/srv/model_zoo/"]
