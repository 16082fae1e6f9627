#!/usr/bin/env bash
# `make bench`: bring the lab up, run the benchmarks, leave the lab up. Not part of make test.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export LAB_DIR="${LAB_DIR:-$REPO/.lab}"
.venv/bin/python include/lab/labctl.py up
# shellcheck disable=SC1091
source "$LAB_DIR/env.sh"
.venv/bin/python bench/run.py
