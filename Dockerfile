# syntax=docker/dockerfile:1
#
# outbox-relay container image.
#
#   docker build -t outbox-relay:dev \
#     --build-arg VERSION="$(git describe --tags --always)" \
#     --build-arg VCS_REF="$(git rev-parse HEAD)" .
#
# Stage 1 ("build") turns the source tree into a wheel and installs it, with
# its dependencies, into a self-contained venv at /opt/venv.
# Stage 2 ("runtime") is a fresh slim image with only that venv, tini and an
# unprivileged user: no compiler, no pip cache, no source tree.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

# (bytecode is compiled at install time: the runtime root filesystem is read-only)
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# .dockerignore keeps .git, venvs, tests, helm/ etc. out of the context.
COPY . .
RUN pip wheel --no-deps --wheel-dir /dist . \
 && pip install --no-cache-dir /dist/*.whl \
 && test -x /opt/venv/bin/outbox-relay

# ------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG PYTHON_IMAGE
ARG VERSION=0.0.0+unknown
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
ARG SOURCE_URL=""
ARG TINI_VERSION=0.19.0-1+b3

LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay: publishes PostgreSQL outbox rows to Kafka or HTTP webhooks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini runs as PID 1 so that SIGTERM from the kubelet / `docker stop` is
# forwarded to the relay (which drains and exits 0) and zombies are reaped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin outbox

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTBOX_HTTP_PORT=8080

# The relay writes nothing to disk: the image runs fine with a read-only root
# filesystem (mount an emptyDir / tmpfs at /tmp).
WORKDIR /tmp
USER 10001:10001

EXPOSE 8080

# Readiness (DB reachable, schema at head, sink reachable) via the stdlib, so
# the image needs no curl. With OUTBOX_HTTP_PORT=0 the server is off and the
# check reports healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; p = os.environ.get('OUTBOX_HTTP_PORT', '8080'); sys.exit(0) if p == '0' else u.urlopen('http://127.0.0.1:%s/readyz' % p, timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["outbox-relay", "run"]
