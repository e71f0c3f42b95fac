"""Models get their validation on held-out X-rays formed independently of the training
renderer: the figures (JSON) and whether they pass the configured bar. Multi-start uses only
models that pass; NULL figures: trained before validation existed, never used. Jobs get a
progress record (a running finetune's iteration, total and ETA) for status and metrics.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 12:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# JSONB on PostgreSQL, JSON text elsewhere (as in xvr_node.catalog.models).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("validation", JSON, nullable=True))
        batch.add_column(
            sa.Column("validated", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("progress")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("validated")
        batch.drop_column("validation")
