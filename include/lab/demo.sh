#!/usr/bin/env bash
# `make demo`: bring the lab up (installs on first use), play the seed's disaster with a
# running app writer, recover it through the Airflow REST API, print the report.
# The lab keeps running afterwards so you can look around (make lab-down stops it).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
export LAB_DIR="${LAB_DIR:-$REPO/.lab}"
.venv/bin/python include/lab/labctl.py up
# shellcheck disable=SC1091
source "$LAB_DIR/env.sh"
.venv/bin/python include/lab/demo.py
echo
echo "The lab is still up: source $LAB_DIR/env.sh; Airflow UI at $LAB_AIRFLOW_URL (user $LAB_AIRFLOW_USER, password in \$LAB_AIRFLOW_PASSWORD)."
echo "Stop it with: make lab-down"
