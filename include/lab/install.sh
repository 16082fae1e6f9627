#!/usr/bin/env bash
# Installs everything the lab and the tests need on a fresh Debian 12 machine, as root.
# Idempotent: each step is skipped when its stamp matches (apt packages, the Barman venv,
# the Airflow venv keyed by the hash of requirements.txt + constraints.txt).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OPT="${BARMAN_DR_OPT:-/opt/barman-dr}"
BARMAN_VERSION="3.19.1"
APT_PACKAGES=(postgresql-15 postgresql-contrib postgresql-client-15 openssh-server openssh-client
              rsync pgbouncer python3-venv util-linux procps iproute2
              chromium fonts-dejavu-core prometheus redis-server ${EXTRA_APT_PACKAGES:-})  # chromium: the UI tests (headless)
# prometheus: the lab scrapes /barman-dr/metrics; promtool checks the shipped rules
# redis-server: the Celery broker of LAB_EXECUTOR=celery (a private instance per lab; the packaged one is never started)

log() { printf '[install] %s\n' "$*"; }
# this machine's pip.conf lists optional local indexes that may be absent: hide that noise only
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

[ "$(id -u)" = 0 ] || { echo "install.sh must run as root (it installs apt packages and creates OS users)" >&2; exit 1; }
mkdir -p "$OPT"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d keeps Debian's maintainer scripts from starting system services we do not use
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# The OS user Barman runs as (the seed's "barman" user on the barman host).
if ! id barman >/dev/null 2>&1; then
  log "useradd barman"
  useradd --system --create-home --home-dir /var/lib/barman-dr --shell /bin/bash barman
fi
# sshd refuses logins for locked accounts under UsePAM; give both users a usable, unknown password hash
for u in barman postgres; do
  if passwd -S "$u" | awk '{print $2}' | grep -q '^L'; then usermod -p '*' "$u"; fi
done

# Barman in its own venv, built from Debian's python3 (the pyenv one under /root is not readable by barman).
BVENV="$OPT/barman-$BARMAN_VERSION"
bver="$("$BVENV/bin/barman" --version 2>&1 || true)"
if [[ "$bver" != "$BARMAN_VERSION "* ]]; then
  log "barman $BARMAN_VERSION venv at $BVENV"
  rm -rf "$BVENV"
  /usr/bin/python3 -m venv "$BVENV"
  quiet_pip "$BVENV/bin/pip" install -q --no-cache-dir "barman==$BARMAN_VERSION" "psycopg2-binary==2.9.13"
fi
chmod -R a+rX "$BVENV"

# The Airflow venv (tests, DAGs, CLI), keyed by the requirement files so a change rebuilds it.
KEY="$( { cat "$REPO/requirements.txt"; if [ -f "$REPO/constraints.txt" ]; then cat "$REPO/constraints.txt"; fi; } | sha256sum | cut -c1-12)"
AVENV="$OPT/airflow-$KEY"
if [ ! -f "$AVENV/.complete" ]; then
  log "airflow venv at $AVENV (a few minutes the first time)"
  rm -rf "$AVENV"
  python3 -m venv "$AVENV"
  quiet_pip "$AVENV/bin/pip" install -q --upgrade pip==25.2
  if [ -f "$REPO/constraints.txt" ]; then
    quiet_pip "$AVENV/bin/pip" install -q -r "$REPO/requirements.txt" -c "$REPO/constraints.txt"
  else
    quiet_pip "$AVENV/bin/pip" install -q -r "$REPO/requirements.txt"
  fi
  "$AVENV/bin/pip" check >/dev/null
  touch "$AVENV/.complete"
fi
ln -sfn "$AVENV" "$REPO/.venv"
log "ok: barman $BVENV, airflow $AVENV (linked as .venv)"
