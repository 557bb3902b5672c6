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
    && mkdir -p /data \
    && chown gradpipe:gradpipe /data

USER gradpipe
# Datasets, runs, models and the Prefect database live here: bind-mount the same host directory at /data in
# every container (relative store paths would resolve in each worker's own working directory).
VOLUME ["/data"]
ENV GRADPIPE_DATA_DIR=/data \
    GRADPIPE_RAW=/data/raw/demo

CMD ["gradpipe", "--help"]
