"""What a PITR step raises when recovery ran but did not produce what was asked."""

from __future__ import annotations

from barman_dr.exceptions import BarmanDrError


class VerificationError(BarmanDrError):
    """Recovery finished but did not produce what was asked (target or data)."""
