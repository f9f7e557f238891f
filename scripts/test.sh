#!/usr/bin/env bash
# The test command: install what is missing, start RabbitMQ, run lint and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/broker.sh start
.venv/bin/ruff check service tests bench scripts harness
.venv/bin/python -m pytest "$@"
