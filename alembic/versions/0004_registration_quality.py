"""Registrations get the quality gate's verdict: reliable (NULL: registered before the gate)
and confidence (0-1), so status, metrics and exports can tell good results from doubtful ones.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("registrations") as batch:
        batch.add_column(sa.Column("reliable", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("confidence", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registrations") as batch:
        batch.drop_column("confidence")
        batch.drop_column("reliable")
