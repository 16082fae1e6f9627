"""remote.sh_argv, JOB_ID_RE and the job-status protocol: argv lists, never shell strings."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from barman_dr.exceptions import BarmanCommandError, RemoteCommandError, ValidationError
from barman_dr.hooks.remote import _KILL_SCRIPT, _START_SCRIPT, _STATUS_SCRIPT, JOB_ID_RE, RemoteHost, sh_argv


def test_sh_argv_shape():
    argv = sh_argv("echo \"$1\"", "a b", "$(id)")
    assert argv == ["sh", "-c", 'echo "$1"', "barman-dr", "a b", "$(id)"]


@pytest.mark.parametrize("hostile", ["a b", "$(touch /tmp/pwned)", "`id`", "x; echo INJECTED", "'\"", "a\nb", "*"])
def test_sh_argv_arguments_are_never_interpreted(hostile):
    # what the SSH server runs is shlex.join(argv) through the login shell: run it the same way locally
    command = shlex.join(sh_argv('printf "%s" "$1"', hostile))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert out == hostile


def test_sh_argv_script_positional_zero():
    command = shlex.join(sh_argv('printf "%s|%s" "$0" "$#"', "x", "y"))
    assert subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout == "barman-dr|2"


@pytest.mark.parametrize("job_id", ["backup-pg-primary-20261125", "dr_pitr.restore.abc123", "a", "A" * 200,
                                    "0-run_1.x"])
def test_job_id_accepted(job_id):
    assert JOB_ID_RE.match(job_id)
    assert RemoteHost("x")._job_dir("/jobs/", job_id) == f"/jobs/{job_id}"


@pytest.mark.parametrize("job_id", ["", "-leading", ".hidden", "../etc", "a/b", "a b", "a;b", "$(id)", "A" * 201, "é"])
def test_job_id_rejected(job_id):
    assert not JOB_ID_RE.match(job_id)
    with pytest.raises(ValueError, match="invalid job id"):
        RemoteHost("x")._job_dir("/jobs", job_id)


def test_job_id_trailing_newline_rejected_by_regex():
    assert not JOB_ID_RE.match("job\n")


@pytest.mark.parametrize(("line", "state", "pid", "code"), [
    ("finished 0", "finished", None, 0),
    ("finished 2", "finished", None, 2),
    ("running 4242", "running", 4242, None),
    ("started 4242", "running", 4242, None),
    ("lost 4242", "lost", 4242, None),
    ("absent", "absent", None, None),
    ("", "absent", None, None),
])
def test_parse_status(line, state, pid, code):
    s = RemoteHost._parse_status("j", line)
    assert (s.state, s.pid, s.exit_code) == (state, pid, code)
    assert s.finished == (state == "finished") and s.running == (state == "running")


def test_job_scripts_run_locally(tmp_path):
    """The detached-job protocol itself, with plain sh (what the remote host runs)."""
    d = str(tmp_path / "job1")

    def sh(script, *args):
        return subprocess.run(sh_argv(script, *args), capture_output=True, text=True, check=True, timeout=30).stdout

    assert sh(_STATUS_SCRIPT, d).strip() == "absent"
    first = sh(_START_SCRIPT, d, "sh", "-c", "echo out; echo err >&2; exit 3").strip().splitlines()[-1]
    assert first.split()[0] in ("started", "finished")
    import time

    for _ in range(100):
        if sh(_STATUS_SCRIPT, d).startswith("finished"):
            break
        time.sleep(0.05)
    assert sh(_STATUS_SCRIPT, d).strip() == "finished 3"
    assert (tmp_path / "job1" / "out").read_text() == "out\n"
    assert (tmp_path / "job1" / "err").read_text() == "err\n"
    assert (tmp_path / "job1" / "argv").read_text().splitlines() == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    # starting again under the same id never runs a second copy: it reports the first one's result
    assert sh(_START_SCRIPT, d, "sh", "-c", "echo second > second").strip() == "finished 3"
    assert not (tmp_path / "second").exists()


def test_kill_stops_the_whole_process_group_even_when_the_leader_dies_first(tmp_path):
    """A killed job's leader shell dies at once; barman/rsync below it must not live on as orphans."""
    import time

    d = str(tmp_path / "job2")
    marker = tmp_path / "still-writing"

    def sh(script, *args):
        return subprocess.run(sh_argv(script, *args), capture_output=True, text=True, check=True, timeout=60).stdout

    # a child that ignores TERM (like a process busy in I/O) and keeps writing
    child = f"trap '' TERM; while true; do date +%s%N >> {marker}; sleep 0.1; done"
    sh(_START_SCRIPT, d, "sh", "-c", f"sh -c \"{child}\" & wait")
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.05)
    assert sh(_STATUS_SCRIPT, d).startswith("running")
    assert sh(_KILL_SCRIPT, d, "2").strip() == "killed-hard"
    size = marker.stat().st_size
    time.sleep(0.5)
    assert marker.stat().st_size == size, "an orphan of the job is still writing"
    pgid = (tmp_path / "job2" / "pid").read_text().strip()
    ps = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True).stdout
    assert [line for line in ps.splitlines() if line.split()[0] == pgid and not line.split()[1].startswith("Z")] == []
    assert sh(_STATUS_SCRIPT, d).startswith("lost")


def test_errors_carry_facts():
    e = BarmanCommandError("barman host", ["barman", "-f", "json", "show-backup", "pg-primary", "nope"], 1,
                           "ERROR: Unknown backup 'nope' for server 'pg-primary'\n")
    assert isinstance(e, RemoteCommandError)
    assert e.exit_code == 1 and "Unknown backup" in e.stderr and e.argv[3] == "show-backup"
    assert "exited 1" in str(e) and "Unknown backup" in str(e)
    v = ValidationError("target_xid", "x" * 500, "digits only")
    assert len(str(v)) < 200 and str(v).startswith("target_xid: ")


# ------------------------------------------------------------ output read to EOF, not to the exit status


class FakeChannel:
    """A paramiko channel whose exit status arrives before the last of its stdout (as OpenSSH may send it)."""

    def __init__(self, chunks: list[bytes], exit_after: int, eof: bool = True) -> None:
        import socket

        self._r, self._w = socket.socketpair()
        self._w.send(b"x")  # always readable: select never blocks, the fake drives the order
        self.chunks, self.exit_after, self.eof, self.sent, self.closed = list(chunks), exit_after, eof, 0, False
        self.polls = 0  # the tail is still in flight for a few polls after the exit status

    def fileno(self) -> int:
        return self._r.fileno()

    def settimeout(self, _t: object) -> None: ...
    def exec_command(self, _c: str) -> None: ...
    def shutdown_write(self) -> None: ...

    def recv_ready(self) -> bool:
        if self.sent >= self.exit_after and self.chunks:
            self.polls += 1
            return self.polls > 3
        return bool(self.chunks)

    def recv(self, _n: int) -> bytes:
        self.sent += 1
        return self.chunks.pop(0)

    def recv_stderr_ready(self) -> bool:
        return False

    @property
    def eof_received(self) -> bool:
        return self.eof and not self.chunks

    def exit_status_ready(self) -> bool:
        return self.sent >= self.exit_after

    def recv_exit_status(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True
        self._r.close()
        self._w.close()


def fake_client(chan: FakeChannel):
    from types import SimpleNamespace

    transport = SimpleNamespace(is_active=lambda: True, open_session=lambda timeout: chan)
    return SimpleNamespace(get_transport=lambda: transport)


def test_output_arriving_after_the_exit_status_is_kept():
    from barman_dr.hooks.remote import _exec

    chunks = [b"a" * 32768, b"tail\n"]
    code, out, _ = _exec(fake_client(FakeChannel(chunks, exit_after=1)), "cat xlog.db", 5)
    assert code == 0 and out == b"a" * 32768 + b"tail\n"


def test_a_background_holder_of_stdout_does_not_hang_the_call(monkeypatch):
    from barman_dr.hooks import remote

    monkeypatch.setattr(remote, "EXIT_DRAIN_S", 0.2)
    code, out, _ = remote._exec(fake_client(FakeChannel([b"started\n"], exit_after=1, eof=False)), "start &", 5)
    assert code == 0 and out == b"started\n"
