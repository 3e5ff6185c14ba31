"""The migration head the control checks at start-up without loading Alembic."""

from __future__ import annotations

from icefarm_control.storage.migrate import HEAD_REVISION, head_revision


def test_the_recorded_head_revision_is_alembics_head() -> None:
    """Start-up skips Alembic when the stored revision equals HEAD_REVISION: it must be true."""
    assert head_revision() == HEAD_REVISION
