#!/usr/bin/env bash
# Create .venv and install the project with its CPU torch pin, the identity network (dlib face descriptor), SLURM
# (dask-jobqueue) and S3 (s3fs) support, dev tools and the docs builder (mkdocs-material). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,identity,cluster,s3,dev,docs]"
