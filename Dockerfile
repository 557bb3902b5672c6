# One image for every service of docker-compose.yml: the Dask scheduler and workers, the Prefect server and
# the flows (`gradpipe serve`). Build: docker compose build (or: docker build -t gradpipe .)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app
COPY . /app
RUN pip install . \
    && useradd --create-home --uid 1000 --user-group gradpipe \
    && mkdir -p /data /prefect \
    && chown gradpipe:gradpipe /data /prefect

USER gradpipe
# Without an object store (docker-compose.local.yml), datasets, runs and models live here: bind-mount the same
# host directory at /data in every container (relative store paths would resolve in each worker's own working
# directory). /prefect holds Prefect's database and settings (a named volume in docker-compose.yml).
VOLUME ["/data", "/prefect"]
ENV GRADPIPE_DATA_DIR=/data \
    GRADPIPE_RAW=/data/raw/demo

CMD ["gradpipe", "--help"]
