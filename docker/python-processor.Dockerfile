# A base image for Python processors: CPython 3.11 with the `dory` wheel (dory-python)
# installed. A processor image adds its module and names its class:
#
#   FROM dory-python:0.1.0
#   COPY counter.py /app/
#   CMD ["counter.py:Counter"]
#
#   docker build -f docker/python-processor.Dockerfile -t dory-python:0.1.0 .
#
# Built from the repository root. Not built on the machine this was written on: see
# examples/kubernetes/README.md.

# The wheel is built as dory-python/scripts/test-python.sh builds it: maturin (the same pinned
# release) in release mode from Cargo.lock. It uses the stable ABI from 3.11 on (abi3-py311), so
# bookworm's python3 (3.11) builds a wheel for the runtime's 3.11.
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin \
 && /opt/maturin/bin/pip install --no-cache-dir "maturin==1.16.0"
WORKDIR /src
COPY . .
RUN /opt/maturin/bin/maturin build --release --locked -m dory-python/Cargo.toml -o /wheels

# Debian 12 as the build stage, so the extension links against the glibc it runs with.
FROM python:3.11-slim-bookworm
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/dory-*.whl \
 && rm -rf /tmp/wheels \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/dory dory
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
# Numeric, so a pod's `runAsNonRoot: true` can check it.
USER 10001:10001
# The SDK's endpoints (DORY_PORT, 8080 by default): /healthz, /readyz, /metrics, /state.
EXPOSE 8080
ENTRYPOINT ["python", "-m", "dory", "run"]
