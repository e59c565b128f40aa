# MVKE demo trainer: a one-shot job that, when Redis holds no active model,
# generates synthetic data, trains MVKE-mt, exports it to ONNX, publishes it and
# loads the feature store (docker/trainer-entrypoint.sh). CPU-only torch.
#   docker build -f docker/trainer.Dockerfile -t mvke-trainer .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
# Where the CPU build of torch comes from: a full index (torch and its dependencies:
# the PyTorch CPU index or a mirror of it), or, if TORCH_FIND_LINKS is set, a wheel
# directory (pip --find-links: an http(s) URL the build can reach) holding the
# torch +cpu wheel, its dependencies then coming from the default index (PyPI).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG RECBOLE_VERSION=1.2.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, the CPU build (+cpu): the PyPI wheel would pull several GB of CUDA
# libraries that a CPU trainer never uses. `torch==2.13.0` in the extras is then
# already satisfied by 2.13.0+cpu. pip ignores a plain-http wheel directory unless
# its host is trusted (a local one: see tests/deploy/test_docker.py).
RUN if [ -n "${TORCH_FIND_LINKS}" ]; then export PIP_FIND_LINKS="${TORCH_FIND_LINKS}"; \
      case "${TORCH_FIND_LINKS}" in http://*) host="${TORCH_FIND_LINKS#http://}"; export PIP_TRUSTED_HOST="${host%%/*}";; esac; \
    else export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}+cpu"
# Dependencies from the project metadata alone (the wheel built here holds no
# package and is uninstalled), so a code change does not reinstall them.
# recbole only ships MovieLens-100K's files for `mvke data ml100k`; its own
# dependency tree is not needed (--no-deps, as in scripts/setup.sh).
# The readme pyproject.toml names is only package metadata at this step: an empty
# stand-in (the real one comes with the code) keeps README edits from reinstalling
# every dependency.
COPY pyproject.toml ./
# DL3013: ".[train,export]" is this project; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN touch README.md \
 && pip install --no-cache-dir ".[train,export]" \
 && pip install --no-cache-dir --no-deps "recbole==${RECBOLE_VERSION}" \
 && pip uninstall --yes mvke \
 && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
COPY . .
RUN pip install --no-cache-dir --no-deps . \
 && mvke --help >/dev/null \
 && groupadd --system --gid 10001 mvke \
 && useradd --system --uid 10001 --gid mvke --home-dir /home/mvke --create-home --shell /usr/sbin/nologin mvke \
 && mkdir -p /data && chown 10001:10001 /data
COPY --chmod=0755 docker/trainer-entrypoint.sh /usr/local/bin/trainer-entrypoint.sh
# /data: synthetic data, checkpoint and bundle of the last run (a named volume in
# docker-compose.yml; created here so the volume starts owned by the mvke user).
VOLUME ["/data"]
WORKDIR /home/mvke
USER 10001:10001
ENV REDIS_URL=redis://redis:6379/0 \
    MVKE_WORK_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["/usr/local/bin/trainer-entrypoint.sh"]
