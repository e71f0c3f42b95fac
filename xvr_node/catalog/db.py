"""Engines, sessions and schema migrations (Alembic) for the catalog database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

# The migrations live at the top of the repository (``alembic/``), beside this package.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "alembic"


def make_engine(url: str) -> Engine:
    """Create the engine for a catalog URL (``postgresql+psycopg://...``).

    Connections are pinged before use so that a restarted server does not fail the next job.
    """
    return create_engine(make_url(url), pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for the catalog; objects stay readable after commit (no expire_on_commit)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(url: str | None = None) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise FileNotFoundError(f"catalog migrations not found at {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        # ConfigParser interpolation: a percent-encoded password must survive it.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the catalog at ``url`` to ``revision`` (the newest by default)."""
    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the catalog at ``url`` back to ``revision`` (``base`` empties it)."""
    command.downgrade(_alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The catalog's schema revision; None when it has never been migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest schema revision this version of xvr-node knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


class SchemaOutdatedError(RuntimeError):
    """The catalog's schema is not the one this version of xvr-node was written for."""


def require_current_schema(url: str) -> None:
    """Refuse to go on unless the catalog is at the head revision."""
    current = current_revision(url)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaOutdatedError(
            f"the catalog database has no schema yet (this xvr-node needs revision {head}): "
            "run `xvr-node db upgrade`"
        )
    scripts = ScriptDirectory.from_config(_alembic_config())
    known = {script.revision for script in scripts.walk_revisions()}
    if current not in known:
        raise SchemaOutdatedError(
            f"the catalog database is at revision {current}, which this xvr-node does not know "
            f"(its newest is {head}): a newer xvr-node migrated it; run that version, or "
            "downgrade the catalog with it before running `xvr-node db upgrade` here"
        )
    raise SchemaOutdatedError(
        f"the catalog database is at revision {current}, this xvr-node needs {head}: "
        "run `xvr-node db upgrade`"
    )


#: Tables of the job engine (procrastinate), created by migration 0006 from its own schema.
ENGINE_TABLE_PREFIX = "procrastinate_"


def owned_by_the_models(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name``: compare only what the models declare, not the engine's."""
    if type_ == "table":
        return not (name or "").startswith(ENGINE_TABLE_PREFIX)
    return True
