"""The initial catalog schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 02:53:55.982869
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# JSONB on PostgreSQL, JSON text elsewhere (as in xvr_node.catalog.models).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
EMPTY_STRING = sa.text("''")

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "carm_profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "manufacturer", sa.String(length=64), server_default=EMPTY_STRING, nullable=False
        ),
        sa.Column("model_name", sa.String(length=64), server_default=EMPTY_STRING, nullable=False),
        sa.Column(
            "station_name", sa.String(length=64), server_default=EMPTY_STRING, nullable=False
        ),
        sa.Column("detector_rows", sa.Integer(), nullable=False),
        sa.Column("detector_columns", sa.Integer(), nullable=False),
        sa.Column("sid_mm", sa.Float(), nullable=True),
        sa.Column("pixel_spacing_row_mm", sa.Float(), nullable=True),
        sa.Column("pixel_spacing_col_mm", sa.Float(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("source IN ('learned', 'config')", name=op.f("ck_carm_profiles_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_carm_profiles")),
        sa.UniqueConstraint(
            "manufacturer",
            "model_name",
            "station_name",
            "detector_rows",
            "detector_columns",
            name="uq_carm_profiles_device",
        ),
    )
    op.create_table(
        "ingest_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "occurred_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("peer_address", sa.String(length=64), nullable=True),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.Text(), server_default=EMPTY_STRING, nullable=False),
        sa.CheckConstraint(
            "event IN ('association_rejected', 'store_failed', 'store_warning', 'import_failed')",
            name=op.f("ck_ingest_events_event"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingest_events")),
    )
    op.create_index(op.f("ix_ingest_events_occurred_at"), "ingest_events", ["occurred_at"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default="3", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", JSON, nullable=True),
        sa.Column("dedupe_key", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            "kind IN ('assemble', 'finetune', 'register', 'export', 'retention', 'noop')",
            name=op.f("ck_jobs_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_jobs_attempts_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_jobs_dedupe_key")),
    )
    op.create_index(
        "ix_jobs_claim", "jobs", ["status", sa.text("priority DESC"), "next_attempt_at"]
    )
    op.create_index(op.f("ix_jobs_next_attempt_at"), "jobs", ["next_attempt_at"])

    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column(
            "issuer_of_patient_id",
            sa.String(length=64),
            server_default=EMPTY_STRING,
            nullable=False,
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_patients_patient_id_issuer_of_patient_id"),
        ),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("accession", sa.String(length=16), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_studies_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_index(op.f("ix_studies_patient_id"), "studies", ["patient_id"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True),
        sa.Column("body_part", sa.String(length=64), nullable=True),
        sa.Column("manufacturer", sa.String(length=64), nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=True),
        sa.Column("station_name", sa.String(length=64), nullable=True),
        sa.Column("instance_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "state IN ('receiving', 'stable', 'assembled', 'failed', 'xray')",
            name=op.f("ck_series_state"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_series_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_last_received_at"), "series", ["last_received_at"])
    op.create_index(op.f("ix_series_study_id"), "series", ["study_id"])

    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        sa.Column("shape", JSON, nullable=True),
        sa.Column("spacing", JSON, nullable=True),
        sa.Column("affine", JSON, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("refusal_reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("state IN ('usable', 'refused')", name=op.f("ck_volumes_state")),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_volumes_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_volumes_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
    )
    op.create_index("ix_volumes_patient_id_created_at", "volumes", ["patient_id", "created_at"])
    op.create_index(op.f("ix_volumes_series_id"), "volumes", ["series_id"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("number_of_frames", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("calling_ae", sa.String(length=16), nullable=True),
        sa.Column("geometry", JSON, nullable=True),
        sa.Column("usability", sa.String(length=16), nullable=False),
        sa.Column("unusable_reason", sa.Text(), nullable=True),
        sa.Column("linked_volume_id", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "usability IN ('usable', 'waiting', 'unusable', 'not_xray')",
            name=op.f("ck_instances_usability"),
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_instances_version_positive")),
        sa.ForeignKeyConstraint(
            ["linked_volume_id"],
            ["volumes.id"],
            name=op.f("fk_instances_linked_volume_id_volumes"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"],
            ["series.id"],
            name=op.f("fk_instances_series_id_series"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint(
            "sop_instance_uid", "version", name=op.f("uq_instances_sop_instance_uid_version")
        ),
    )
    op.create_index(op.f("ix_instances_linked_volume_id"), "instances", ["linked_volume_id"])
    op.create_index(op.f("ix_instances_series_id"), "instances", ["series_id"])

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=True),
        sa.Column("volume_id", sa.Integer(), nullable=True),
        sa.Column("base_model_id", sa.Integer(), nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("conventions", JSON, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "state IN ('training', 'ready', 'superseded', 'failed')", name=op.f("ck_models_state")
        ),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["models.id"], name=op.f("fk_models_base_model_id_models")
        ),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patients.id"],
            name=op.f("fk_models_patient_id_patients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_models_volume_id_volumes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("patient_id", "version", name=op.f("uq_models_patient_id_version")),
    )
    op.create_index(op.f("ix_models_base_model_id"), "models", ["base_model_id"])
    op.create_index(op.f("ix_models_volume_id"), "models", ["volume_id"])

    op.create_table(
        "registrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("frame_index", sa.Integer(), nullable=True),
        sa.Column("volume_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("initializer", sa.String(length=16), nullable=False),
        sa.Column("initial_matrix", JSON, nullable=True),
        sa.Column("final_matrix", JSON, nullable=False),
        sa.Column("intrinsics", JSON, nullable=False),
        sa.Column("conventions", JSON, nullable=False),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("iterations", sa.Integer(), nullable=True),
        sa.Column("wall_time_s", sa.Float(), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.Column("superseded_by_id", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "initializer IN ('model', 'dicom', 'fixed', 'multistart', 'tracking')",
            name=op.f("ck_registrations_initializer"),
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_registrations_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_registrations_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_registrations_model_id_models"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["superseded_by_id"],
            ["registrations.id"],
            name=op.f("fk_registrations_superseded_by_id_registrations"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_registrations_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registrations")),
    )
    op.create_index(
        "ix_registrations_instance_id_frame_index", "registrations", ["instance_id", "frame_index"]
    )
    op.create_index(op.f("ix_registrations_job_id"), "registrations", ["job_id"])
    op.create_index(op.f("ix_registrations_model_id"), "registrations", ["model_id"])
    op.create_index(
        op.f("ix_registrations_superseded_by_id"), "registrations", ["superseded_by_id"]
    )
    op.create_index(op.f("ix_registrations_volume_id"), "registrations", ["volume_id"])

    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("registration_id", sa.Integer(), nullable=True),
        sa.Column("object_kind", sa.String(length=8), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "object_kind IN ('sro', 'sr', 'sc')", name=op.f("ck_exports_object_kind")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'retrying', 'parked')", name=op.f("ck_exports_status")
        ),
        sa.ForeignKeyConstraint(
            ["registration_id"],
            ["registrations.id"],
            name=op.f("fk_exports_registration_id_registrations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
        sa.UniqueConstraint(
            "sop_instance_uid", "destination", name=op.f("uq_exports_sop_instance_uid_destination")
        ),
    )
    op.create_index(op.f("ix_exports_registration_id"), "exports", ["registration_id"])
    op.create_index("ix_exports_status_next_attempt_at", "exports", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_exports_status_next_attempt_at", table_name="exports")
    op.drop_index(op.f("ix_exports_registration_id"), table_name="exports")

    op.drop_table("exports")
    op.drop_index(op.f("ix_registrations_volume_id"), table_name="registrations")
    op.drop_index(op.f("ix_registrations_superseded_by_id"), table_name="registrations")
    op.drop_index(op.f("ix_registrations_model_id"), table_name="registrations")
    op.drop_index(op.f("ix_registrations_job_id"), table_name="registrations")
    op.drop_index("ix_registrations_instance_id_frame_index", table_name="registrations")

    op.drop_table("registrations")
    op.drop_index(op.f("ix_models_volume_id"), table_name="models")
    op.drop_index(op.f("ix_models_base_model_id"), table_name="models")

    op.drop_table("models")
    op.drop_index(op.f("ix_instances_series_id"), table_name="instances")
    op.drop_index(op.f("ix_instances_linked_volume_id"), table_name="instances")

    op.drop_table("instances")
    op.drop_index(op.f("ix_volumes_series_id"), table_name="volumes")
    op.drop_index("ix_volumes_patient_id_created_at", table_name="volumes")

    op.drop_table("volumes")
    op.drop_index(op.f("ix_series_study_id"), table_name="series")
    op.drop_index(op.f("ix_series_last_received_at"), table_name="series")

    op.drop_table("series")
    op.drop_index(op.f("ix_studies_patient_id"), table_name="studies")

    op.drop_table("studies")
    op.drop_table("patients")
    op.drop_index(op.f("ix_jobs_next_attempt_at"), table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")

    op.drop_table("jobs")
    op.drop_index(op.f("ix_ingest_events_occurred_at"), table_name="ingest_events")

    op.drop_table("ingest_events")
    op.drop_table("carm_profiles")
