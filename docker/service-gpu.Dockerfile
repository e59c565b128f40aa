# MVKE tag service, GPU build: FastAPI + onnxruntime-gpu (CUDA execution provider).
#   docker build -f docker/service-gpu.Dockerfile -t mvke-service-gpu .
# Same code and CLI as docker/service.Dockerfile. The provider is chosen when the
# service starts (MVKE_ORT_PROVIDER=auto: CUDA if a session really runs on it,
# else CPU, logged); without a GPU the container still serves, on CPU.
#
# CUDA and cuDNN come from pip (onnxruntime-gpu[cuda,cudnn] pulls the nvidia-*
# wheels that match the onnxruntime-gpu build; currently CUDA 13 / cuDNN 9), so a
# plain CUDA base image is enough: it provides the NVIDIA container-runtime
# settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_DRIVER_CAPABILITIES, and the
# NVIDIA_REQUIRE_CUDA check that refuses to start on a too-old host driver).
# Keep its CUDA major equal to the one onnxruntime-gpu is built for.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu22.04

# ---- build: a venv with `.[service-gpu]` only --------------------------------
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# DL3008: the Python 3.11 packages follow the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The readme pyproject.toml names is only package metadata at this step: an empty
# stand-in (the real one comes with the code) keeps README edits from reinstalling
# every dependency.
COPY pyproject.toml ./
# Dependencies first, from the project metadata alone (the wheel built here holds
# no package and is uninstalled), then the code: a code change does not reinstall
# onnxruntime-gpu and its CUDA wheels.
# DL3013: ".[service-gpu]" is this project; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN touch README.md \
 && pip install --no-cache-dir ".[service-gpu]" \
 && pip uninstall --yes mvke
COPY . .
# Install the code, check the image's dependency set, and list the directories of
# the pip-installed CUDA/cuDNN libraries (site-packages/nvidia/**/lib): the runtime
# stage puts them on the loader path (ld.so.conf), so the CUDA provider finds them
# without LD_LIBRARY_PATH or onnxruntime.preload_dlls().
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import service.app, onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()" \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in the service image" >&2; exit 1; fi \
 && if pip show --quiet onnxruntime 2>/dev/null; then echo "CPU onnxruntime must not sit beside onnxruntime-gpu" >&2; exit 1; fi \
 && python -c "import pathlib, sysconfig; root = pathlib.Path(sysconfig.get_paths()['purelib'], 'nvidia'); print('\n'.join(sorted({str(p.parent) for p in root.rglob('lib*.so*')})))" \
    > /opt/venv/nvidia-libs.conf \
 && test -s /opt/venv/nvidia-libs.conf && cat /opt/venv/nvidia-libs.conf

# ---- runtime ----------------------------------------------------------------
FROM ${CUDA_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="mvke-service-gpu" \
      org.opencontainers.image.description="MVKE tag service (FastAPI + ONNX Runtime, CUDA)"
# DL3008: the Python 3.11 package follows the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mvke \
 && useradd --system --uid 10001 --gid mvke --home-dir /home/mvke --create-home --shell /usr/sbin/nologin mvke
COPY --from=build /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-libs.conf /etc/ld.so.conf.d/zz-onnxruntime-nvidia-pip.conf && ldconfig
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REDIS_URL=redis://redis:6379/0 \
    MVKE_ORT_PROVIDER=auto
WORKDIR /home/mvke
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["mvke", "serve", "--host", "0.0.0.0", "--port", "8000"]
