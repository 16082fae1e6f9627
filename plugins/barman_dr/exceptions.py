"""The barman-dr exception tree.

Modelled on Barman's own (`barman/exceptions.py`): one root, specific leaves that carry
the facts an operator needs (command, exit code, stderr, the field that was wrong).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class BarmanDrError(Exception):
    """Root of every error barman-dr raises on purpose."""


class InventoryError(BarmanDrError):
    """The server inventory is missing, malformed or refers to something unknown."""


class ValidationError(BarmanDrError):
    """A user-supplied value is invalid. Names the field, the value and the fix."""

    def __init__(self, field: str, value: object, fix: str) -> None:
        self.field = field
        self.value = value
        self.fix = fix
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{field}: invalid value {shown}: {fix}")


class RemoteCommandError(BarmanDrError):
    """A command on a remote host exited non-zero (or could not be run)."""

    def __init__(self, host: str, argv: Sequence[str], exit_code: int | None, stderr: str, stdout: str = "") -> None:
        self.host = host
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr
        self.stdout = stdout
        tail = (stderr or stdout).strip().splitlines()[-15:]
        super().__init__(
            f"on {host}: `{shlex.join(self.argv)}` exited {exit_code}" + (":\n" + "\n".join(tail) if tail else "")
        )


class BarmanCommandError(RemoteCommandError):
    """`barman` exited non-zero. Carries the exit code and stderr like Barman's CommandFailedException."""


class BarmanOutputError(BarmanDrError):
    """`barman -f json` printed something that is not the JSON we expect."""


class HostKeyError(BarmanDrError):
    """The SSH host key of a host is unknown or changed: never connect blindly."""


class SshConnectError(BarmanDrError):
    """The SSH connection itself failed (refused, timed out, authentication)."""


class RemoteJobError(BarmanDrError):
    """A detached remote job was lost (its process vanished without an exit code) or timed out."""


class PreflightError(BarmanDrError):
    """A safety check before a destructive step failed: nothing was changed."""


class AuditUnavailableError(BarmanDrError):
    """The audit trail cannot be written: destructive work must not start unaudited."""


class ApprovalMissingError(BarmanDrError):
    """A destructive step of a four-eyes DAG found no approval (or not this run's server lock): nothing is done."""
