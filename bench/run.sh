#!/usr/bin/env bash
# `make bench`: bring the lab up, run the benchmarks, leave the lab up. Not part of make test.
#   BENCH_PARTS=1,2,3 (default all)   part 1: bench/run.py (orchestration overhead, BENCH_REPS)
#                                             bench/xid_vs_time.py (xid vs time target, BENCH_XID_WAL=512M)
#                                     part 2: bench/size_scaling.py (BENCH_SIZES=100M,1G,4G, BENCH_WAL, ...)
#                                     part 3: bench/fleet_scale.py (BENCH_FLEET=1,10,50, BENCH_EXECUTORS=local,celery)
# Results: bench/results/latest.json (one section per part) and a table per part on stdout.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export LAB_DIR="${LAB_DIR:-$REPO/.lab}"
PARTS=",${BENCH_PARTS:-1,2,3},"
if [[ $PARTS == *,2,* ]] && ! command -v pgbackrest >/dev/null; then
  # the reference row of part 2: Debian's pgBackRest (2.45 on Debian 12)
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null
fi
.venv/bin/python include/lab/labctl.py up
# shellcheck disable=SC1091
source "$LAB_DIR/env.sh"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) CPUs): figures taken under load are not final"
if [[ $PARTS == *,1,* ]]; then .venv/bin/python bench/run.py; .venv/bin/python bench/xid_vs_time.py; fi
if [[ $PARTS == *,2,* ]]; then .venv/bin/python bench/size_scaling.py; fi
if [[ $PARTS == *,3,* ]]; then .venv/bin/python bench/fleet_scale.py; fi
