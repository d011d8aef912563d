# The resolver's container image. Build: docker build -t resolver .
# Run, mount your own rules, reload: docs/deploying.md#container.
#
# tests/test_dockerfile.py checks this file without Docker: each COPY source is in the build
# context (.dockerignore lets in only what is copied), the build stage's files build the
# wheel, the image's config loads, and the user, ports, health check and entry point agree
# with it.

ARG PYTHON_VERSION=3.11

# --- build: the wheel (the package, with the shipped rules and example config as package
# data) and the wheels of its dependencies, so the image installs offline from them.
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY resolver/ resolver/
COPY rules/exchanges.yaml rules/
COPY deploy/resolver.yaml deploy/
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# --- the image: a virtualenv holding the wheel and its dependencies, and nothing to build.
FROM python:${PYTHON_VERSION}-slim-bookworm

# tini is PID 1. The kernel gives PID 1 no default signal actions, so a SIGTERM arriving
# before the resolver has installed its handlers (while it loads a large rule set) would be
# lost and `docker stop` would wait out its timeout; tini forwards every signal to the
# resolver, where the defaults apply. And it reaps: the supervisor waits for its own workers,
# but not for the orphans of `docker exec` sessions, which are re-parented to PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10053 resolver \
    && useradd --system --uid 10053 --gid resolver --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin resolver

# No pip inside the virtualenv: the base image's pip installs into it (--python). The
# modules are compiled at install, as the root filesystem may be read-only at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/resolver \
    && pip --python /opt/resolver/bin/python install --no-cache-dir --disable-pip-version-check \
       --no-index --find-links /wheels dns-filter-resolver

COPY deploy/container/resolver.yaml /etc/resolver/resolver.yaml
COPY rules/exchanges.yaml /etc/resolver/rules/exchanges.yaml
# The state directory (blocking.state_dir: last good copies of downloaded rule sources),
# the one place the resolver writes; a volume or tmpfs may be mounted over it.
RUN install -d -o resolver -g resolver -m 0750 /var/lib/resolver

ENV PATH=/opt/resolver/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Numeric, so Kubernetes can check runAsNonRoot against the image.
USER 10053:10053

# Port 53 without root or a capability: binding a port below
# net.ipv4.ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE, and this sysctl belongs to
# the container's network namespace. Docker (20.10 and later) sets it to 0 in every container;
# `docker run --sysctl net.ipv4.ip_unprivileged_port_start=53` and the Kubernetes manifests
# set it explicitly. So every capability can be dropped. (A file capability on the Python
# binary would be ignored under no-new-privileges, as Kubernetes' allowPrivilegeEscalation:
# false sets it, and would be handed to every Python program in the image.)
EXPOSE 53/udp 53/tcp 9153/tcp

# slim has no curl: Python's urllib. An answer other than 200 raises, and exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/resolver/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9153/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/resolver/bin/resolver"]
CMD ["serve", "-c", "/etc/resolver/resolver.yaml"]
