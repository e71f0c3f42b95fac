"""Jobs run on procrastinate: its schema (tables, functions, triggers; pinned to the
procrastinate release in pyproject.toml) joins the catalog, and the ledger's own lease
columns go: the engine heartbeats its workers. Each job row points at the engine job that
runs it now. Jobs still queued or running at upgrade get an engine job, so none is lost.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On psycopg itself: without parameters it takes the script as it is (no % placeholders).
    op.get_bind().connection.driver_connection.execute(SchemaManager.get_schema())
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_column("jobs", "heartbeat_at")
    op.drop_column("jobs", "lease_expires_at")
    op.alter_column("jobs", "lease_owner", new_column_name="worker")
    op.add_column("jobs", sa.Column("engine_job_id", sa.BigInteger(), nullable=True))
    op.create_index("ix_jobs_engine_job_id", "jobs", ["engine_job_id"])
    # Unfinished jobs of the old queue: one engine job each, due when they were.
    op.execute(
        "UPDATE jobs SET status = 'queued', worker = NULL, engine_job_id = "
        "(procrastinate_defer_jobs_v1(ARRAY[ROW(jobs.kind, 'xvr_node.' || jobs.kind, "
        "jobs.priority, NULL, NULL, jsonb_build_object('job_id', jobs.id), "
        "jobs.next_attempt_at)::procrastinate_job_to_defer_v1]))[1] "
        "WHERE status IN ('queued', 'running')"
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_engine_job_id", table_name="jobs")
    op.drop_column("jobs", "engine_job_id")
    op.alter_column("jobs", "worker", new_column_name="lease_owner")
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_jobs_claim", "jobs", ["status", sa.text("priority DESC"), "next_attempt_at"]
    )
    bind = op.get_bind()
    for statement in (
        "SELECT 'DROP TABLE IF EXISTS ' || string_agg(quote_ident(tablename), ', ') "
        "|| ' CASCADE' FROM pg_tables WHERE starts_with(tablename, 'procrastinate')",
        "SELECT 'DROP FUNCTION IF EXISTS ' || string_agg(oid::regprocedure::text, ', ') "
        "|| ' CASCADE' FROM pg_proc WHERE starts_with(proname, 'procrastinate')",
        "SELECT 'DROP TYPE IF EXISTS ' || string_agg(quote_ident(typname), ', ') "
        "|| ' CASCADE' FROM pg_type "
        "WHERE starts_with(typname, 'procrastinate') AND typtype IN ('e', 'c')",
    ):
        drop = bind.exec_driver_sql(statement).scalar()
        if drop:
            bind.exec_driver_sql(drop)
