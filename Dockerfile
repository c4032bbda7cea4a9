# The prefill-bootstrap sidecar: `prefill-bootstrap serve` with the [server] extra, no torch.
#
#   docker build -t prefill-bootstrap .                   # online: dependencies from the index
#   scripts/build-image.sh                                # offline: local base + wheelhouse
#
# BASE_IMAGE must provide python3 (>= 3.10) with the venv module; both stages use it, so the
# virtualenv built in the first stage runs unchanged in the second.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

# A directory inside the build context holding a wheel of this project and of every dependency
# (scripts/build-image.sh makes one and builds with it). Empty: install from the package index.
ARG WHEELHOUSE=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The sources (.dockerignore lets nothing else in), or, offline, just the wheelhouse.
COPY . /src
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/prefill-bootstrap; \
    pip="/opt/prefill-bootstrap/bin/pip"; \
    if [ -n "${WHEELHOUSE}" ]; then \
        set -- "/src/${WHEELHOUSE}"/prefill_bootstrap-*.whl; \
        "${pip}" install --no-index --find-links "/src/${WHEELHOUSE}" "$1[server]"; \
    else \
        "${pip}" install "/src[server]"; \
    fi; \
    "${pip}" uninstall --yes pip setuptools >/dev/null 2>&1 || true; \
    /opt/prefill-bootstrap/bin/prefill-bootstrap --version

FROM ${BASE_IMAGE}

# The server's own port default (shared/protocol.py DEFAULT_PORT, SGLang's bootstrap port);
# tests/test_deploy_manifests.py keeps the two equal.
ARG PORT=8998
ARG UID=10001

# A fixed numeric user so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --gid "${UID}" prefill-bootstrap \
    && useradd --uid "${UID}" --gid "${UID}" --no-create-home \
        --home-dir /var/lib/prefill-bootstrap --shell /usr/sbin/nologin prefill-bootstrap \
    && mkdir -p /var/lib/prefill-bootstrap \
    && chown "${UID}:${UID}" /var/lib/prefill-bootstrap

COPY --from=build /opt/prefill-bootstrap /opt/prefill-bootstrap

# Listen on every interface (ranks on other nodes register here); keep state in the volume.
ENV PATH=/opt/prefill-bootstrap/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFILL_BOOTSTRAP_HOST=0.0.0.0 \
    PREFILL_BOOTSTRAP_PORT=${PORT} \
    PREFILL_BOOTSTRAP_STATE_DIR=/var/lib/prefill-bootstrap

USER ${UID}:${UID}
WORKDIR /var/lib/prefill-bootstrap
VOLUME ["/var/lib/prefill-bootstrap"]
EXPOSE ${PORT}

# No curl in the image: the interpreter we ship asks /health on the configured port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PREFILL_BOOTSTRAP_PORT'], timeout=2)"]

ENTRYPOINT ["prefill-bootstrap"]
CMD ["serve"]
