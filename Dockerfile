# syntax=docker/dockerfile:1
# BatchSender: one image for every process; the command chooses (the default is the worker).
#
#   docker build -t batchsender .
#   docker run --env-file .env.prod batchsender                        # batchsender worker
#   docker run --env-file .env.prod -p 6001:6001 batchsender batchsender api
#   docker run --env-file .env.prod batchsender batchsender migrate
#   docker run --env-file .env.prod -p 3000:3000 batchsender batchsender web
#
# Kubernetes (k8s/) sets `args`, never `command`, so tini stays PID 1 there too.
#
# The base is pinned by version and digest: python:3.11.16-slim-bookworm, the multi-arch
# index digest published for python:3.11-slim-bookworm on 2026-08-25 (docker-library's
# repo-info). Debian 12 like the development machines; bump both together.
FROM python:3.11.16-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS base

# --- build: a virtual environment with the package and its dependencies -------------------
FROM base AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Every dependency has a manylinux wheel for CPython 3.11 (uvloop, asyncpg, orjson,
# cryptography, ijson, clickhouse-connect): no compiler in this stage either.
RUN python -m venv /opt/batchsender

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when they change.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/batchsender/bin/pip install -r /tmp/requirements.txt

# Then the package itself (.dockerignore lets only these in; devkit/, tests and bench stay out).
COPY engine/ engine/
COPY api/ api/
COPY cli/ cli/
COPY providers/ providers/
COPY web/ web/
RUN /opt/batchsender/bin/pip install --no-deps . \
 && /opt/batchsender/bin/pip uninstall --yes pip setuptools

# --- runtime: the slim base, tini and the virtual environment, nothing else ---------------
FROM base AS runtime

LABEL org.opencontainers.image.title="batchsender" \
      org.opencontainers.image.description="High-throughput batch e-mail: api, worker, web, migrate"

# tini as PID 1: it forwards SIGTERM to the command and reaps orphans. Without it Python is
# PID 1, and PID 1 ignores a signal it has no handler for: a SIGTERM that arrives while the
# API or the supervisor is still migrating (before their handlers are installed) would be
# ignored until the kubelet's SIGKILL. The supervisor then drains on SIGTERM itself
# (engine/supervisor.py: children finish their chunks, SIGKILL after DRAIN_TIMEOUT).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 batchsender \
 && useradd --system --uid 10001 --gid batchsender --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin batchsender

COPY --from=build /opt/batchsender /opt/batchsender

# Settings come from the environment (Kubernetes Secret and ConfigMap, --env-file); no .env
# file is in the image. Everything the
# processes write goes to /tmp (metrics files, worker heartbeats, upload spool), so the root
# filesystem can be read-only (Kubernetes mounts an emptyDir there). The API and the web
# dashboard listen on all interfaces.
ENV PATH=/opt/batchsender/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BATCHSENDER_ENV=prod \
    API_HOST=0.0.0.0 \
    API_PORT=6001 \
    WEB_HOST=0.0.0.0 \
    WEB_PORT=3000 \
    METRICS_DIR=/tmp/batchsender-metrics

USER 10001:10001
WORKDIR /tmp
EXPOSE 6001 3000 6002

# For plain Docker (Kubernetes ignores HEALTHCHECK and probes by itself, see k8s/): the
# command PID 1 runs decides what healthy means. api / web: /health/live answers; worker: a
# worker process's event loop touched its heartbeat within WORKER_HEARTBEAT_TIMEOUT (30 s);
# one-shot commands (migrate, keys): nothing to probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["python", "-c", "import glob, os, sys, time, urllib.request\ncmd = open('/proc/1/cmdline', 'rb').read().split(b'\\0')\nif b'worker' in cmd:\n    sys.exit(not any(time.time() - os.path.getmtime(p) < 30 for p in glob.glob('/tmp/batchsender-heartbeat-*/*')))\nfor name, variable, port in ((b'api', 'API_PORT', '6001'), (b'web', 'WEB_PORT', '3000')):\n    if name in cmd:\n        urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get(variable, port), timeout=2)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["batchsender", "worker"]
