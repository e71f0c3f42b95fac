"""C-arm profiles are keyed on the zoom (field-of-view mode) as well as device and matrix:
Imager Pixel Spacing changes with the zoom, so a spacing learned in one mode must not fill
another. Existing profiles get the empty zoom ("not stated").

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EMPTY_STRING = sa.text("''")
DEVICE = ["manufacturer", "model_name", "station_name", "detector_rows", "detector_columns"]


def upgrade() -> None:
    with op.batch_alter_table("carm_profiles") as batch:
        batch.add_column(
            sa.Column("zoom", sa.String(length=64), server_default=EMPTY_STRING, nullable=False)
        )
        batch.drop_constraint("uq_carm_profiles_device", type_="unique")
        batch.create_unique_constraint("uq_carm_profiles_device", [*DEVICE, "zoom"])


def downgrade() -> None:
    # Profiles of one device in several zoom modes collapse to the newest row (highest id).
    op.execute(
        "DELETE FROM carm_profiles WHERE id NOT IN ("
        " SELECT MAX(id) FROM carm_profiles GROUP BY " + ", ".join(DEVICE) + ")"
    )
    with op.batch_alter_table("carm_profiles") as batch:
        batch.drop_constraint("uq_carm_profiles_device", type_="unique")
        batch.create_unique_constraint("uq_carm_profiles_device", DEVICE)
        batch.drop_column("zoom")
