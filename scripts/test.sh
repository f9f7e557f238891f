#!/usr/bin/env bash
# The test command: install what is missing, start RabbitMQ, run lint and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The console's browser tests drive Debian's Chromium (Playwright cannot download its own build here).
if ! command -v chromium >/dev/null 2>&1; then
    echo ">> installing chromium from Debian packages (the console's browser tests)"
    SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
bash scripts/broker.sh start
.venv/bin/ruff check service tests bench scripts harness
.venv/bin/python -m pytest "$@"
