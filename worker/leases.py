"""What a job learns about its lease: another worker holds the work, took it over, or it changed.

Shared by the extraction job (a scene) and the CARD job (a card input): both claim their row with a
lease in PostgreSQL and commit only while they still hold it, on the generation they claimed.
"""

from __future__ import annotations


class LeaseHeld(Exception):
    """Another live worker holds the lease; wait for it to finish or expire."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(f"lease held for another {remaining_s:.0f} s")
        self.remaining_s = remaining_s


class LeaseLost(LeaseHeld):
    """Our lease was taken over while we worked; our writes are rolled back, the other writer wins."""


class SceneChanged(Exception):
    """The watcher found the product changed while we worked on it (its generation moved on): our
    writes are rolled back, and the job claims the row again to work on the new version."""
