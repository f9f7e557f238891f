#!/usr/bin/env bash
# Install everything the kit needs on a fresh Debian/Ubuntu machine (run as root
# or with sudo available): RabbitMQ from Debian, and a virtualenv in .venv with
# the pinned Python dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo ">> installing rabbitmq-server from Debian packages"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rabbitmq-server >/dev/null
    # Debian starts the service where systemd runs; the kit starts it itself otherwise.
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
