"""Run commands on a remote host over SSH, through the SSH provider's hook.

Two ways to run a command:

* `run(argv)`: short commands (seconds). One SSH exec; an inactivity timeout applies.
* `start_job / job_status / wait_job / kill_job`: long commands (backup, restore). The
  command is started detached (`setsid`, stdio to files) under a job directory on the
  remote host, so it survives the SSH session, an sshd restart and a worker crash. We
  then poll with short SSH commands. A retried task with the same job id *attaches* to
  the running job or collects its exit code instead of starting a second copy, and
  `on_kill` can terminate the job's whole process group. This is the model of the SSH
  provider's `SSHRemoteJobOperator`, kept small and synchronous.

Commands are argv lists joined with `shlex.join`: a value never becomes shell syntax.
"""

from __future__ import annotations

import json
import re
import selectors
import shlex
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import paramiko
from airflow.providers.ssh.hooks.ssh import SSHHook

from barman_dr.exceptions import HostKeyError, RemoteCommandError, RemoteJobError, SshConnectError
from barman_dr.models import CommandResult, JobStatus, utc_stamp

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")

# Starts argv detached under job dir $1. Idempotent: if a job with that id is running it
# reports it, if it finished it reports the exit code; it never starts a second copy.
# The job's shell records its own pid ($$ == its process group, thanks to setsid) first,
# then runs the command, then writes the exit code atomically (rc.tmp -> rc).
# A job is alive while any non-zombie process of its process group (pgid == the leader's pid,
# thanks to setsid) exists: the leader shell may die first and leave barman or rsync running,
# and on hosts whose init does not reap at once a zombie must not count as running.
_ALIVE_FN = r"""
alive() { ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { f = 1 } END { exit !f }'; }
"""

_START_SCRIPT = _ALIVE_FN + r"""
set -eu
d="$1"; shift
mkdir -p "$d"
if [ -f "$d/rc" ]; then echo "finished $(cat "$d/rc")"; exit 0; fi
if [ -f "$d/pid" ] && alive "$(cat "$d/pid")"; then echo "running $(cat "$d/pid")"; exit 0; fi
if [ -f "$d/pid" ]; then echo "lost $(cat "$d/pid")"; exit 0; fi
printf '%s\n' "$@" > "$d/argv"
setsid sh -c 'd="$1"; shift; echo $$ > "$d/pid.tmp"; mv "$d/pid.tmp" "$d/pid"; date +%s > "$d/started";
  "$@" > "$d/out" 2> "$d/err"; rc=$?; echo $rc > "$d/rc.tmp"; mv "$d/rc.tmp" "$d/rc"' barman-dr-job "$d" "$@" \
  < /dev/null > /dev/null 2>&1 &
i=0
while [ ! -f "$d/pid" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
echo "started $(cat "$d/pid")"
"""

# The job's shell writes rc *before* it exits: when its group is gone, rc is read again
# before calling the job lost (it may have finished between the two checks).
_STATUS_SCRIPT = _ALIVE_FN + r"""
d="$1"
if [ -f "$d/rc" ]; then echo "finished $(cat "$d/rc")"; exit 0; fi
if [ ! -f "$d/pid" ]; then echo "absent"; exit 0; fi
if alive "$(cat "$d/pid")"; then echo "running $(cat "$d/pid")"; exit 0; fi
if [ -f "$d/rc" ]; then echo "finished $(cat "$d/rc")"; else echo "lost $(cat "$d/pid")"; fi
"""

# Long poll: wait on the host (checking every $3 s) until the job is no longer running or
# $2 seconds have passed, then report like _STATUS_SCRIPT. One SSH exec per window instead
# of one per client-side poll, and the end of a job is seen within $3 s, not within the
# client's growing interval.
_WAIT_SCRIPT = _ALIVE_FN + r"""
d="$1"; window="$2"; step="$3"
end=$(( $(date +%s) + window ))
while :; do
  if [ -f "$d/rc" ]; then echo "finished $(cat "$d/rc")"; exit 0; fi
  if [ ! -f "$d/pid" ]; then echo "absent"; exit 0; fi
  if ! alive "$(cat "$d/pid")"; then
    if [ -f "$d/rc" ]; then echo "finished $(cat "$d/rc")"; else echo "lost $(cat "$d/pid")"; fi
    exit 0
  fi
  if [ "$(date +%s)" -ge "$end" ]; then echo "running $(cat "$d/pid")"; exit 0; fi
  sleep "$step"
done
"""

# Terminate the job's process group, wait for all of it, escalate to SIGKILL. Records that it was killed.
# (dash's kill takes `-PGID`, not `-- -PGID`: with `--` it silently signalled the leader only.)
_KILL_SCRIPT = _ALIVE_FN + r"""
d="$1"; grace="$2"
[ -f "$d/pid" ] || { echo "absent"; exit 0; }
pid="$(cat "$d/pid")"
alive "$pid" || { echo "not-running"; exit 0; }
kill -TERM -"$pid" 2>/dev/null || true
i=0
while alive "$pid" && [ $i -lt "$grace" ]; do sleep 1; i=$((i+1)); done
if alive "$pid"; then kill -KILL -"$pid" 2>/dev/null || true; echo "killed-hard"; else echo "killed"; fi
date +%s > "$d/killed"
"""

# Move a finished/lost job directory aside so a new attempt can start (kept for forensics).
_RESET_SCRIPT = _ALIVE_FN + r"""
d="$1"; tag="$2"
[ -d "$d" ] || exit 0
if [ -f "$d/pid" ] && [ ! -f "$d/rc" ] && alive "$(cat "$d/pid")"; then echo "refusing: job running" >&2; exit 3; fi
mv "$d" "$d.$tag"
"""


def _fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint (what `ssh-keygen -lf` prints), to compare keys by eye."""
    import base64
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def sh_argv(script: str, *args: str) -> list[str]:
    """argv that runs an inline POSIX sh script with positional arguments (no interpolation)."""
    return ["sh", "-c", script, "barman-dr", *args]


class RemoteHost:
    """A host reached over SSH with the Airflow connection `ssh_conn_id`.

    Host-key checking is never turned off here: a connection that sets
    `no_host_key_check` is refused, because a DR tool that can be pointed at an impostor
    host would restore production data onto it.
    """

    #: longest single wait on the host per SSH exec (`wait_job`), and how long it polls every 0.1 s
    LONG_POLL_WINDOW = 15
    FAST_POLL_FOR = 30.0

    def __init__(self, ssh_conn_id: str, *, name: str | None = None, cmd_timeout: float = 120,
                 log: Callable[[str], None] | None = None) -> None:
        self.ssh_conn_id = ssh_conn_id
        self.name = name or ssh_conn_id
        self.cmd_timeout = cmd_timeout
        self._log = log
        self.connects = 0

    @cached_property
    def ssh_hook(self) -> SSHHook:
        hook = SSHHook(ssh_conn_id=self.ssh_conn_id, cmd_timeout=self.cmd_timeout, conn_retry_attempts=2,
                       keepalive_interval=15)
        if hook.no_host_key_check:
            raise HostKeyError(
                f"connection {self.ssh_conn_id!r} disables host-key checking (no_host_key_check); "
                "barman-dr refuses to run DR commands without it. Put the host's public key in the "
                "connection's `host_key` extra or in ~/.ssh/known_hosts."
            )
        return hook

    def _client(self) -> paramiko.SSHClient:
        try:
            client = self.ssh_hook.client
            transport = client.get_transport() if client else None
            if not (transport and transport.is_active()):
                self.connects += 1
            return self.ssh_hook.get_conn()
        except paramiko.BadHostKeyException as exc:
            raise HostKeyError(
                f"SSH host key of {self.name} ({exc.hostname}) CHANGED: got {exc.key.get_name()} "
                f"{_fingerprint(exc.key)}, expected {_fingerprint(exc.expected_key)}. "
                "Refusing to connect (possible man-in-the-middle or a rebuilt host). Verify the host's "
                f"key out of band, then update connection {self.ssh_conn_id!r} (extra `host_key`)."
            ) from exc
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc) or ("Server" in str(exc) and "not found" in str(exc)):
                raise HostKeyError(
                    f"SSH host key of {self.name} is unknown ({exc}). Add it to connection "
                    f"{self.ssh_conn_id!r} (extra `host_key`) after verifying it."
                ) from exc
            raise SshConnectError(f"SSH to {self.name} via {self.ssh_conn_id!r} failed: {exc}") from exc
        except (TimeoutError, OSError) as exc:
            raise SshConnectError(f"cannot reach {self.name} via {self.ssh_conn_id!r}: {exc}") from exc

    def close(self) -> None:
        if "ssh_hook" in self.__dict__ and self.ssh_hook.client:
            try:
                self.ssh_hook.client.close()
            finally:
                self.ssh_hook.client = None

    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True,
            error_cls: type[RemoteCommandError] = RemoteCommandError) -> CommandResult:
        """Run argv on the host; `timeout` is an inactivity timeout (seconds without output)."""
        command = shlex.join(argv)
        start = time.monotonic()
        client = self._client()
        inactivity = self.cmd_timeout if timeout is None else timeout
        try:
            code, out, err = _exec(client, command, inactivity)
        except (paramiko.SSHException, EOFError, OSError) as exc:  # the session died under us: reconnect next time
            self.close()
            raise SshConnectError(f"SSH session to {self.name} broke while running {argv[0]}: {exc}") from exc
        except TimeoutError as exc:
            self.close()
            raise RemoteCommandError(self.name, list(argv), None, f"no output for {inactivity}s (inactivity "
                                     "timeout); long commands must run as remote jobs") from exc
        if self._log:
            self._log(f"{self.name}: {shlex.join(argv)[:300]} -> exit {code}")
        result = CommandResult(self.name, list(argv), code, out.decode("utf-8", "replace"),
                               err.decode("utf-8", "replace"), round(time.monotonic() - start, 3))
        if check and code != 0:
            raise error_cls(self.name, list(argv), code, result.stderr, result.stdout)
        return result

    def stream_lines(self, argv: Sequence[str], on_line: Callable[[str], None], *, timeout: float | None = None,
                     stderr_limit: int = 65536) -> CommandResult:
        """Run argv and hand each stdout line to `on_line` as it arrives; nothing is kept but stderr's tail.

        For output too large to hold (a pg_waldump of hours of WAL): the caller aggregates
        as lines stream by. The returned result has an empty stdout; the caller checks the
        exit code (nothing is raised for a non-zero exit: some tools end with one by design).
        """
        command = shlex.join(argv)
        start = time.monotonic()
        client = self._client()
        inactivity = self.cmd_timeout if timeout is None else timeout
        pending = bytearray()

        def feed(chunk: bytes) -> None:
            pending.extend(chunk)
            end = pending.rfind(b"\n")
            if end < 0:
                return
            for raw in bytes(pending[:end]).split(b"\n"):
                on_line(raw.decode("utf-8", "replace"))
            del pending[:end + 1]

        try:
            code, _, err = _exec(client, command, inactivity, on_stdout=feed)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self.close()
            raise SshConnectError(f"SSH session to {self.name} broke while running {argv[0]}: {exc}") from exc
        except TimeoutError as exc:
            self.close()
            raise RemoteCommandError(self.name, list(argv), None, f"no output for {inactivity}s (inactivity "
                                     "timeout)") from exc
        if pending:
            on_line(bytes(pending).decode("utf-8", "replace"))
        if self._log:
            self._log(f"{self.name}: {command[:300]} -> exit {code} (streamed)")
        return CommandResult(self.name, list(argv), code, "", err[-stderr_limit:].decode("utf-8", "replace"),
                             round(time.monotonic() - start, 3))

    # ------------------------------------------------------------------ remote jobs
    def _job_dir(self, job_root: str, job_id: str) -> str:
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return f"{job_root.rstrip('/')}/{job_id}"

    @staticmethod
    def _parse_status(job_id: str, line: str) -> JobStatus:
        word, _, rest = line.strip().partition(" ")
        if word == "finished":
            return JobStatus(job_id, "finished", exit_code=int(rest))
        if word in ("running", "started"):
            return JobStatus(job_id, "running", pid=int(rest))
        if word == "lost":
            return JobStatus(job_id, "lost", pid=int(rest) if rest.isdigit() else None)
        return JobStatus(job_id, "absent")

    def start_job(self, job_root: str, job_id: str, argv: Sequence[str]) -> JobStatus:
        """Start argv detached (or report the job already running/finished under that id)."""
        out = self.run(sh_argv(_START_SCRIPT, self._job_dir(job_root, job_id), *argv), timeout=30).stdout
        return self._parse_status(job_id, out.strip().splitlines()[-1] if out.strip() else "absent")

    def job_status(self, job_root: str, job_id: str) -> JobStatus:
        out = self.run(sh_argv(_STATUS_SCRIPT, self._job_dir(job_root, job_id)), timeout=30).stdout
        return self._parse_status(job_id, out.strip() or "absent")

    def job_output(self, job_root: str, job_id: str, max_bytes: int = 1_000_000) -> tuple[str, str]:
        d = self._job_dir(job_root, job_id)
        out = self.run(["tail", "-c", str(max_bytes), f"{d}/out"], check=False, timeout=30).stdout
        err = self.run(["tail", "-c", str(max_bytes), f"{d}/err"], check=False, timeout=30).stdout
        return out, err

    def kill_job(self, job_root: str, job_id: str, grace_seconds: int = 20) -> str:
        out = self.run(sh_argv(_KILL_SCRIPT, self._job_dir(job_root, job_id), str(grace_seconds)),
                       timeout=grace_seconds + 30, check=False).stdout
        return out.strip()

    def reset_job(self, job_root: str, job_id: str, tag: str) -> None:
        """Keep a finished or lost attempt's directory under another name so a new attempt can run."""
        self.run(sh_argv(_RESET_SCRIPT, self._job_dir(job_root, job_id), tag), timeout=30)

    def reset_if_failed(self, job_root: str, job_id: str) -> tuple[JobStatus, str | None]:
        """Set an earlier failed or lost attempt aside (kept as `<job>.failed-<stamp>`) so a retry starts clean.

        Returns the job's status before the reset and the stamp used, or None when there was
        nothing to reset (no job yet, or one running or succeeded that a retry attaches to).
        """
        status = self.job_status(job_root, job_id)
        if not status.failed:
            return status, None
        stamp = utc_stamp()
        self.reset_job(job_root, job_id, f"failed-{stamp}")
        return status, stamp

    def wait_job(self, job_root: str, job_id: str, *, timeout: float, poll: Callable[[float], float] | None = None,
                 on_poll: Callable[[JobStatus], None] | None = None) -> JobStatus:
        """Wait until the job finishes. Tolerates SSH outages (the job runs on regardless).

        Long-polls: each SSH exec waits on the host for up to `LONG_POLL_WINDOW` seconds,
        checking every 0.1 s during the first `FAST_POLL_FOR` seconds and every 0.5 s after
        (a job's end is seen within that step). `poll`, when given, restores the old
        client-side polling with that interval function (tests).
        """
        started = time.monotonic()
        deadline = started + timeout
        interval = 0.25
        ssh_failures = 0
        d = self._job_dir(job_root, job_id)
        while True:
            remaining = deadline - time.monotonic()
            try:
                if poll is None and remaining > 1:
                    step = "0.1" if time.monotonic() - started < self.FAST_POLL_FOR else "0.5"
                    window = int(min(self.LONG_POLL_WINDOW, remaining))
                    out = self.run(sh_argv(_WAIT_SCRIPT, d, str(window), step), timeout=window + 30).stdout
                    status = self._parse_status(job_id, out.strip().splitlines()[-1] if out.strip() else "absent")
                else:
                    status = self.job_status(job_root, job_id)
                ssh_failures = 0
            except SshConnectError:
                ssh_failures += 1
                if ssh_failures > 30:
                    raise
                self.close()
                status = None
                time.sleep(1)
            if status is not None:
                if on_poll:
                    on_poll(status)
                if status.finished:
                    return status
                if status.state in ("lost", "absent"):
                    raise RemoteJobError(
                        f"remote job {job_id} on {self.name} is {status.state}: its process is gone without an "
                        "exit code (host restarted or process killed). Check the job directory, then retry the task."
                    )
            if time.monotonic() > deadline:
                raise RemoteJobError(f"remote job {job_id} on {self.name} still running after {timeout:.0f}s")
            if poll is not None or remaining <= 1:
                time.sleep(interval)
                interval = poll(interval) if poll else min(interval * 1.5, 3.0)

    def run_job(self, job_root: str, job_id: str, argv: Sequence[str], *, timeout: float,
                error_cls: type[RemoteCommandError] = RemoteCommandError,
                on_poll: Callable[[JobStatus], None] | None = None) -> CommandResult:
        """Start (or attach to) a detached job, wait for it, and return its result."""
        start = time.monotonic()
        status = self.start_job(job_root, job_id, argv)
        if status.state == "lost":
            raise RemoteJobError(f"remote job {job_id} on {self.name} was lost; reset it before retrying")
        if not status.finished:
            status = self.wait_job(job_root, job_id, timeout=timeout, on_poll=on_poll)
        out, err = self.job_output(job_root, job_id)
        result = CommandResult(self.name, list(argv), int(status.exit_code or 0), out, err,
                               round(time.monotonic() - start, 3))
        if status.exit_code != 0:
            raise error_cls(self.name, list(argv), status.exit_code, err, out)
        return result


#: after the exit status, how long the output may stay silent before EOF (a detached background process
#: may hold the channel's stdout open: never wait for it longer than this)
EXIT_DRAIN_S = 5.0


def _exec(client: paramiko.SSHClient, command: str, inactivity: float | None,
          on_stdout: Callable[[bytes], None] | None = None) -> tuple[int, bytes, bytes]:
    """Run one command on an open SSH client; like SSHHook.exec_ssh_client_command, but quiet.

    The provider's method logs every output line at INFO (a pg_controldata dump, a JSON
    document); we log the command and its exit code instead. `inactivity` is the longest
    silence tolerated, as in the provider. With `on_stdout`, stdout is handed over chunk by
    chunk as it arrives instead of being collected (output larger than memory: pg_waldump).

    Output is read until the channel's EOF, not until the exit status: OpenSSH sends
    `exit-status` as soon as the command exits, possibly before the rest of its output
    (seen: a 32,802-byte `cat` of Barman's WAL catalogue cut at 32,768 bytes, which hid the
    newest WAL from the coverage proof).
    """
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise paramiko.SSHException("transport is not active")
    chan = transport.open_session(timeout=30)
    chan.settimeout(None)
    chan.exec_command(command)
    chan.shutdown_write()
    out, err = bytearray(), bytearray()

    def take_stdout(chunk: bytes) -> None:
        if on_stdout is None:
            out.extend(chunk)
        else:
            on_stdout(chunk)

    # paramiko wakes the selector on data, EOF and close, not on the exit status: poll in short steps and keep
    # the deadlines here (the inactivity since the last output; the drain after the exit status)
    exited_at: float | None = None
    last_data = time.monotonic()
    with selectors.DefaultSelector() as sel:
        sel.register(chan, selectors.EVENT_READ)
        while True:
            if chan.recv_ready():
                take_stdout(chan.recv(65536))
                last_data = time.monotonic()
                continue
            if chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
                last_data = time.monotonic()
                continue
            if chan.eof_received or chan.closed:
                break  # everything the command wrote has arrived
            now = time.monotonic()
            if chan.exit_status_ready():
                exited_at = exited_at if exited_at is not None else now
                if now - max(exited_at, last_data) >= EXIT_DRAIN_S:
                    break  # exited, and silent since: a background process holds its output open
            elif inactivity is not None and now - last_data >= inactivity:
                chan.close()
                raise TimeoutError(f"no output for {inactivity}s")
            sel.select(0.2)
    while chan.recv_ready():
        take_stdout(chan.recv(65536))
    while chan.recv_stderr_ready():
        err.extend(chan.recv_stderr(65536))
    # the output is closed; the command may still run (it closed its stdout): its exit within `inactivity`
    deadline = None if inactivity is None else time.monotonic() + inactivity
    while not chan.exit_status_ready():
        if deadline is not None and time.monotonic() > deadline:
            chan.close()
            raise TimeoutError(f"no exit status {inactivity}s after the output ended")
        time.sleep(0.05)
    code = chan.recv_exit_status()
    chan.close()
    return code, bytes(out), bytes(err)


def parse_json_output(text: str, what: str) -> Any:
    """Parse JSON printed by a remote tool; tolerate log lines printed before the document."""
    from barman_dr.exceptions import BarmanOutputError

    text = text.strip()
    if not text:
        raise BarmanOutputError(f"{what}: empty output where JSON was expected")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
        if start > 0:
            try:
                return json.loads(text[start:])
            except json.JSONDecodeError:
                pass
        raise BarmanOutputError(f"{what}: output is not JSON: {text[:300]!r}") from None
