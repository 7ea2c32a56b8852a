# fuseport server image: the gRPC kernel service on a CUDA GPU (CPU when none is given).
#
#   docker build -t fuseport .
#   docker run --rm --init --gpus all -p 50051:50051 -v fuseport-data:/var/lib/fuseport \
#       -v "$PWD/tokens:/run/secrets/fuseport/tokens:ro" fuseport
#
# (--init puts a minimal init in front of the server to reap orphaned compiler
# subprocesses; Python as PID 1 does not reap processes it did not start.)
#
# The official PyTorch runtime image already carries a CUDA build of torch that our
# range (torch>=2.11,<2.15) accepts, so the project is installed on top of it and torch
# is never downloaded again. Pinned to an exact release tag (append @sha256:<digest> for
# byte-identical rebuilds); 2.11 is what the GPU machines run.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# A host compiler is needed at run time, not just at build time: Inductor's CPU backend
# compiles the C++ it generates, and Triton builds its small CUDA launcher/driver helper
# modules with the C compiler on first use. Without it every compile fails and each call
# is served by the (slower) unfused fallback.
# DL3008 (pin apt versions) is ignored on purpose: the Ubuntu archive keeps only the
# current update of each package, so a pinned version stops resolving within weeks; the
# pinned base image fixes the distribution release, which is what keeps g++ stable.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owns the only writable state: the volume below.
RUN useradd --no-log-init --system --create-home --home-dir /home/fuseport \
        --shell /usr/sbin/nologin --uid 10001 --user-group fuseport \
    && mkdir -p /var/lib/fuseport \
    && chown fuseport:fuseport /var/lib/fuseport

# Only what the wheel needs (see .dockerignore), so edits to tests or docs keep this
# layer and the next one cached.
COPY pyproject.toml README.md /tmp/fuseport-src/
COPY proto/ /tmp/fuseport-src/proto/
COPY wire/ /tmp/fuseport-src/wire/
COPY server/ /tmp/fuseport-src/server/
COPY client/ /tmp/fuseport-src/client/
COPY bench/ /tmp/fuseport-src/bench/
COPY cli/ /tmp/fuseport-src/cli/

# The constraint pins torch to the build already in the image: if a future base image
# fell outside our torch range, pip must fail here rather than quietly replace the CUDA
# build with a multi-GB download of another one.
RUN python -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' \
        > /tmp/torch-constraint.txt \
    && python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        -c /tmp/torch-constraint.txt /tmp/fuseport-src \
    && rm -rf /tmp/fuseport-src /tmp/torch-constraint.txt

# Bind every interface: inside a container 127.0.0.1 is unreachable from the published
# port. Kernels registered by clients and the compiler caches live on the volume, so a
# restarted or replaced container neither loses kernels nor recompiles them (both caches
# key their entries by compiler version and target GPU, so a newer image does not reuse
# stale ones).
# FUSEPORT_TARGET is where `fuseport health|list|describe` inside the container connect:
# change it together with FUSEPORT_PORT.
# Safe by default: a published port is reachable from other machines, so the server
# needs tokens, read from a file mounted at this fixed path (lines of `TOKEN ROLE`,
# roles admin and user; a Docker or Kubernetes Secret). Without the file the container
# exits at once, saying so. TLS is one step more: mount a certificate and key and set
# FUSEPORT_TLS_CERT/FUSEPORT_TLS_KEY, plus FUSEPORT_TLS_CA (the CA the health check
# trusts; FUSEPORT_TLS_SERVER_NAME when the certificate does not name localhost). To
# serve without any of it, on a network you trust, run with
# `-e FUSEPORT_AUTH_TOKENS= -e FUSEPORT_INSECURE=1`. The health check needs no token.
# DL3064 (sensitive data in ENV) is ignored on purpose: FUSEPORT_AUTH_TOKENS is the path
# of the mounted secret, not a token; no secret is ever baked into the image.
# hadolint ignore=DL3064
ENV FUSEPORT_HOST=0.0.0.0 \
    FUSEPORT_PORT=50051 \
    FUSEPORT_TARGET=127.0.0.1:50051 \
    FUSEPORT_AUTH_TOKENS=/run/secrets/fuseport/tokens \
    FUSEPORT_STORE_DIR=/var/lib/fuseport/store \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/fuseport/inductor \
    TRITON_CACHE_DIR=/var/lib/fuseport/triton \
    PYTHONUNBUFFERED=1

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/fuseport
VOLUME ["/var/lib/fuseport"]
EXPOSE 50051

# Asks the server's gRPC health service (what orchestrators ask too) at FUSEPORT_TARGET;
# `fuseport health` imports only grpc, so a check takes a tenth of a second. The start
# period covers the server importing torch and initialising CUDA.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["fuseport", "health", "--timeout", "3"]

# Exec form, so `docker stop`'s SIGTERM reaches the server itself (no shell in between);
# it answers by reporting NOT_SERVING and draining in-flight calls for
# FUSEPORT_GRACE_SECONDS (default 10). docker stop also waits 10 s before SIGKILL: when
# raising the grace, give `docker stop -t` (or Kubernetes' terminationGracePeriodSeconds)
# a few seconds more than it.
ENTRYPOINT ["fuseport"]
CMD ["serve"]
