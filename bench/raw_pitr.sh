#!/usr/bin/env bash
# The seed's runbook done by hand, as a plain shell script: the baseline dr_pitr is compared with.
#   pause PgBouncer -> stop PostgreSQL -> move the data directory aside -> barman restore
#   --target-time (over SSH, as the barman user) -> start -> wait for promotion -> count -> resume
# Usage (lab env sourced): bench/raw_pitr.sh TARGET_TIME
# Prints one JSON line with the timestamp of every phase boundary (epoch seconds).
set -euo pipefail
TARGET="$1"
PGBIN=/usr/lib/postgresql/15/bin
DATA="$LAB_DIR/pg/pg-primary/data"
SOCK="$LAB_DIR/run/pg-primary"
ADDR="${LAB_NET}.11"
ADMIN_PW=$(python3 -c "import json; print(json.load(open('$LAB_DIR/secrets/lab.json'))['pgbouncer_admin'])")
BOUNCER="host=$ADDR port=6432 dbname=pgbouncer user=pgbouncer_admin password=$ADMIN_PW"
now() { date +%s.%N; }
as_pg() { runuser -u postgres -- "$@"; }

# the seed's lesson, before anything stops (dr_pitr does the same in wal_coverage, also before the freeze):
# without it the WAL after the backup is not archived and recovery ends before the target
psql -X -q "$LAB_PRIMARY_DSN" -c "select pg_current_xact_id()" >/dev/null
$LAB_BARMAN switch-wal --force --archive pg-primary >/dev/null
t_freeze=$(now);   psql -X -q "$BOUNCER" -c "PAUSE shop" >/dev/null
t_stop=$(now);     as_pg "$PGBIN/pg_ctl" stop -D "$DATA" -m fast -w >/dev/null
t_move=$(now);     mv "$DATA" "$DATA.raw-$(date -u +%Y%m%dT%H%M%SZ)"
t_restore=$(now)
# $LAB_BARMAN is `ssh ... barman`: arguments pass through the remote shell, so quote them for it
REMOTE_SSH=$(printf '%q' "ssh -F $LAB_DIR/ssh/barman_ssh_config postgres@pg-primary")
# shellcheck disable=SC2086
$LAB_BARMAN restore --remote-ssh-command "$REMOTE_SSH" --target-time "$(printf '%q' "$TARGET")" \
  --target-action promote pg-primary latest "$DATA" >/dev/null
t_start=$(now)
as_pg "$PGBIN/pg_ctl" start -D "$DATA" -l "$LAB_DIR/log/pg-primary.log" -W \
  -o "-c listen_addresses=$ADDR -c port=5432 -c unix_socket_directories=$SOCK -c cluster_name=pg-primary" >/dev/null
until [ "$(as_pg psql -X -At -h "$SOCK" -c 'select pg_is_in_recovery()' 2>/dev/null)" = "f" ]; do sleep 0.2; done
t_count=$(now)
COUNTS=$(as_pg psql -X -At -h "$SOCK" -d shop -c "select count(*) || ',' || count(*) filter (where status='completed') from critical_orders")
t_resume=$(now);   psql -X -q "$BOUNCER" -c "RESUME shop" >/dev/null
t_end=$(now)
echo "{\"freeze\": $t_freeze, \"stop\": $t_stop, \"move\": $t_move, \"restore\": $t_restore, \"start\": $t_start, \"count\": $t_count, \"resume\": $t_resume, \"end\": $t_end, \"counts\": \"$COUNTS\"}"
