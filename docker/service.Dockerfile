# MVKE tag service, CPU build: FastAPI + ONNX Runtime (CPU). No torch in this image.
#   docker build -f docker/service.Dockerfile -t mvke-service .
# Settings come from the environment: REDIS_URL and MVKE_* (see service/settings.py).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a venv with `.[service]` only ----------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the project metadata alone (pyproject.toml: the wheel
# built here holds no package and is uninstalled), so that a code change does
# not reinstall onnxruntime, fastapi, pyarrow...
# The readme pyproject.toml names is only package metadata at this step: an empty
# stand-in (the real one comes with the code) keeps README edits from reinstalling
# every dependency.
COPY pyproject.toml ./
# DL3013: ".[service]" is this project; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN touch README.md \
 && pip install --no-cache-dir ".[service]" \
 && pip uninstall --yes mvke
# Then the code (the context is filtered by .dockerignore), non-editable: it
# lands in the venv's site-packages and /src stays in this stage.
COPY . .
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import service.app, onnxruntime" \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the service image" >&2; exit 1; fi

# ---- runtime ----------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mvke-service" \
      org.opencontainers.image.description="MVKE tag service (FastAPI + ONNX Runtime, CPU)"
RUN groupadd --system --gid 10001 mvke \
 && useradd --system --uid 10001 --gid mvke --home-dir /home/mvke --create-home --shell /usr/sbin/nologin mvke
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REDIS_URL=redis://redis:6379/0
WORKDIR /home/mvke
USER 10001:10001
EXPOSE 8000
# Liveness only (/readyz turns 200 once a model is loaded and Redis answers).
# python + urllib: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["mvke", "serve", "--host", "0.0.0.0", "--port", "8000"]
