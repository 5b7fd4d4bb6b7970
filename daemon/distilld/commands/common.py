"""What the commands share: the daemon's store and policies, opened as the daemon left
them (a command never creates an empty one)."""

from __future__ import annotations

from distilld.errors import ConfigError
from distilld.settings import Settings
from distilld.store.sqlite import SqliteStore


def existing_store(settings: Settings) -> SqliteStore:
    """The store a daemon wrote (for `check` and `status`), never a new empty one."""
    if not settings.store_path.is_file():
        raise ConfigError(
            f"no sample store at {settings.store_path}: the daemon has not run with "
            f"DISTILLD_STATE_DIR={settings.state_dir} yet (set it to the daemon's state directory)"
        )
    return SqliteStore(settings.store_path)
