# The operator's image: slim Python, runtime dependencies only, a non-root user.
#   docker build -t truenas-incus-operator .
# Reproducible: the base is pinned to a full Python version and Debian release (bump both FROM lines
# together, on purpose), and the dependencies come from the lock (requirements/runtime.txt, uv.lock's
# export, `make lock`) with hashes; the project goes on top with --no-deps, built by the locked
# setuptools. Not pinned by digest: none could be checked from our machines (no registry access);
# add one with `docker buildx imagetools inspect python:3.11.17-slim-trixie` where you can.
FROM python:3.11.17-slim-trixie AS build
WORKDIR /src
COPY requirements/runtime.txt ./
RUN python -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --require-hashes -r runtime.txt
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN /venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11.17-slim-trixie
COPY --from=build /venv /venv
RUN groupadd --gid 65532 operator && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin operator
USER 65532:65532
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080
ENTRYPOINT ["truenas-incus-operator"]
CMD ["run", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
