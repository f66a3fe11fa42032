# The lab's MLflow tracking server: MLflow and the PostgreSQL driver, nothing else. Built by compose.yaml
# (`docker compose -f docker/compose.yaml up -d --build`) from the repository root; the command is set there.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Constrained by metalab's lock: the server runs the very MLflow, SQLAlchemy and driver versions that CI
# tests natively (scripts/tracking_server.sh) and that metalab's client uses.
COPY requirements/lock.txt /tmp/lock.txt
RUN pip install --constraint /tmp/lock.txt mlflow==3.17.2 psycopg2-binary==2.9.13 \
    && rm /tmp/lock.txt \
    && useradd --create-home --uid 1000 --user-group mlflow \
    && install -d -o mlflow -g mlflow /artifacts

# /artifacts is a volume: created here so a fresh named volume starts owned by the server's user.
VOLUME /artifacts
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
