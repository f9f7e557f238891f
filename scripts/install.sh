#!/usr/bin/env bash
# Install everything the kit needs on a fresh Debian/Ubuntu machine (run as root
# or with sudo available): RabbitMQ from Debian, and a virtualenv in .venv with
# the pinned Python dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# RabbitMQ, Prometheus (with promtool), Alertmanager (with amtool) and Redis (the result
# backend of task status and cancel) from Debian.
# Where systemd runs, Debian starts them as services; the kit starts its own
# instances otherwise (scripts/broker.sh, python -m service stack up).
missing=()
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)  # KIT_RESULT_BACKEND: task status and cancel
# docker-compose only validates docker-compose.yml here (no engine needed); without
# --no-install-recommends it would pull in the Docker engine.
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    echo ">> installing ${missing[*]} from Debian packages"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo ">> creating .venv"
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi
echo ">> installing Python dependencies (pinned in pyproject.toml)"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"

if [ ! -x .venv-exporter/bin/python ]; then
    echo ">> creating .venv-exporter for celery-exporter"
    "$PYTHON" -m venv .venv-exporter
fi
.venv-exporter/bin/python -m pip install -q -r deploy/exporter/requirements.txt
