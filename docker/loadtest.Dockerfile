# Load generator: locust, headless, against the tag service (docker-compose.yml,
# profile `loadtest`): python -m loadtest.run --url URL --users N --duration 60s
#   docker build -f docker/loadtest.Dockerfile -t mvke-loadtest .
# loadtest/run.py runs locust from the source tree (locustfile.py, targets.yaml
# beside it, PYTHONPATH=the tree), so the code stays in /app instead of being
# installed; reports go to /app/loadtest/out/<timestamp>/ (a volume in compose).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies from the project metadata alone (the wheel built here holds no
# package and is uninstalled), then the code.
# The readme pyproject.toml names is only package metadata at this step: an empty
# stand-in (the real one comes with the code) keeps README edits from reinstalling
# every dependency.
COPY pyproject.toml ./
# DL3013: ".[loadtest]" is this project; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN touch README.md \
 && pip install --no-cache-dir ".[loadtest]" \
 && pip uninstall --yes mvke \
 && groupadd --system --gid 10001 mvke \
 && useradd --system --uid 10001 --gid mvke --home-dir /home/mvke --create-home --shell /usr/sbin/nologin mvke
COPY . .
ENV PYTHONPATH=/app \
    MPLCONFIGDIR=/tmp/matplotlib
RUN mkdir -p /app/loadtest/out && chown 10001:10001 /app/loadtest/out \
 && python -m loadtest.run --help >/dev/null
USER 10001:10001
CMD ["python", "-m", "loadtest.run", "--help"]
