"""Alembic environment for the catalog: run by `xvr-node db upgrade` and by `alembic` itself."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context

from xvr_node.catalog.db import make_engine, owned_by_the_models
from xvr_node.catalog.models import Base

URL_ENVIRONMENT_VARIABLE = "XVR_NODE__DATABASE__URL"

config = context.config
target_metadata = Base.metadata

# Only the `alembic` command has an ini file; `xvr-node db upgrade` keeps its own logging.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """The URL set by ``xvr_node.catalog.db.upgrade``, else the environment's (shell use)."""
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(URL_ENVIRONMENT_VARIABLE)
    if not url:
        raise RuntimeError(
            f"no catalog URL: run `xvr-node db upgrade`, or set {URL_ENVIRONMENT_VARIABLE}"
        )
    return url


def run_migrations_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``)."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                include_name=owned_by_the_models,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
