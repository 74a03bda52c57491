#!/usr/bin/env bash
# README's test command: lint (ruff, incl. mccabe complexity <= 15) then the default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
