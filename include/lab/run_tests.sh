#!/usr/bin/env bash
# `make test`: bring the lab up, run every test suite, bring the lab down even when tests fail.
# Prints the test counts; exits with pytest's status (or ruff's, when lint fails).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
export LAB_DIR="${LAB_DIR:-$REPO/.lab}"
PY="$REPO/.venv/bin/python"
mkdir -p test-artifacts

down() { "$PY" include/lab/labctl.py down > test-artifacts/lab-down.log 2>&1 || true; }
trap down EXIT

echo "== ruff (lint, including the AIR rules)"
"$REPO/.venv/bin/ruff" check . || exit 1

echo "== lab up"
"$PY" include/lab/labctl.py up || { echo "lab-up failed: logs in $LAB_DIR/log"; cp -r "$LAB_DIR/log" test-artifacts/lab-log 2>/dev/null; exit 1; }
# shellcheck disable=SC1091
source "$LAB_DIR/env.sh"

echo "== pytest (LocalExecutor)"
"$REPO/.venv/bin/pytest" tests ${PYTEST_ARGS:-} --junitxml=test-artifacts/junit.xml
rc=$?

# The same lab restarted on CeleryExecutor (Redis + the inventory's workers): the suites marked
# celery_lab (the seed PITR, the daily verification, worker loss, queue refusals) run again there.
echo "== lab on CeleryExecutor (restart-airflow with LAB_EXECUTOR=celery)"
if LAB_EXECUTOR=celery "$PY" include/lab/labctl.py restart-airflow; then
  # shellcheck disable=SC1091
  source "$LAB_DIR/env.sh"
  echo "== pytest (CeleryExecutor: -m celery_lab)"
  "$REPO/.venv/bin/pytest" tests -m celery_lab ${PYTEST_ARGS:-} --junitxml=test-artifacts/junit-celery.xml
  crc=$?
else
  echo "the Celery lab did not start: logs in $LAB_DIR/log"; crc=1
fi
cp -r "$LAB_DIR/log" test-artifacts/lab-log 2>/dev/null || true
[ "$rc" -ne 0 ] && exit "$rc"
exit $crc
