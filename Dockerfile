# syntax=docker/dockerfile:1
# Images of docker-compose.yml, from the pinned dependencies:
#   target kit       workers, beat, Flower, demo traffic, broker-definitions
#                    (python -m service ..., python -m service flower: Flower behind its login)
#   target exporter  danihodovic/celery-exporter (deploy/exporter/requirements.txt)
#                    in a virtual environment of its own: it pins prometheus-client<0.22
# Both run as the unprivileged user kit (10001). Build: docker compose build.

FROM python:3.11.13-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 kit \
 && useradd --system --uid 10001 --gid kit --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin kit
WORKDIR /app

FROM base AS exporter
COPY deploy/exporter/requirements.txt /tmp/exporter-requirements.txt
RUN python -m venv /opt/exporter \
 && /opt/exporter/bin/pip install -r /tmp/exporter-requirements.txt
ENV PATH=/opt/exporter/bin:$PATH
COPY scripts/celery_exporter.py scripts/celery_exporter.py
USER kit
EXPOSE 9808
CMD ["python", "scripts/celery_exporter.py", "--help"]

FROM base AS kit
# The dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY service ./service
# KIT_STATE_DIR (beat's schedule, worker metrics, reports) belongs to kit; the
# broker definitions volume to uid 999 (rabbitmq's), which broker-definitions runs as.
RUN pip install --no-deps . \
 && rm -rf build ./*.egg-info \
 && install -d -o kit -g kit /var/lib/kit /var/lib/kit/reports \
 && install -d -o 999 -g 999 /var/lib/rabbitmq-definitions
USER kit
EXPOSE 9810 9811 5555 5580 8000
CMD ["python", "-m", "service", "--help"]
