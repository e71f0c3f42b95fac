"""Outbox rows get a ``sending`` state: handed to an association and not yet answered. A
deliverer killed mid-send leaves them so, and the next one asks the destination (C-FIND)
whether they arrived before it sends them again. Delivery runs as engine jobs, one
destination at a time, so the old claim on ``next_attempt_at`` is gone with no column change.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "status IN ('pending', 'sent', 'retrying', 'parked')"
AFTER = "status IN ('pending', 'sending', 'sent', 'retrying', 'parked')"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_exports_status"), "exports", type_="check")
    op.create_check_constraint(op.f("ck_exports_status"), "exports", AFTER)


def downgrade() -> None:
    # An interrupted send cannot be asked about without this state: send it again.
    op.execute("UPDATE exports SET status = 'pending' WHERE status = 'sending'")
    op.drop_constraint(op.f("ck_exports_status"), "exports", type_="check")
    op.create_check_constraint(op.f("ck_exports_status"), "exports", BEFORE)
