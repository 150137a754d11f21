"""Settings: the only package that reads environment variables and the config file.

``load_settings()`` reads the environment and the TOML config once and returns an
immutable ``Settings`` (``settings.values``); everything else receives it explicitly.
Environment variables override the file. Each section of the file is read and checked in
``settings.sections``. Provider API keys are held in ``Secret`` so that no ``repr``, log
line or error message can show them.

Environment:
    PARLEY_DATA_DIR          data directory (default ``./data``)
    DATABASE_URL             SQLAlchemy URL (default ``sqlite:///<data dir>/parley.db``)
    PARLEY_CONFIG            TOML config (default ``parley.toml`` in the working directory)
    PARLEY_MASTER_KEY        bearer key required on every request when set
    PARLEY_HOST, PARLEY_PORT where ``parley serve`` listens (127.0.0.1:8000)
    PARLEY_MAX_BODY_BYTES    request body limit, 413 above it (default 10 MiB)
    PARLEY_SQLITE_SYNCHRONOUS  NORMAL (default: WAL commits survive a crash of parley)
                             or FULL (they also survive a power loss or OS crash)
    PARLEY_RECORDING         durable (default: acknowledge after commit) or async
    PARLEY_WRITER            thread (default: the store writer is a thread of the server)
                             or process (a child process, off the server's interpreter lock)
    PARLEY_LOG_LEVEL         INFO by default
    PARLEY_SECRET_KEY        the master secret that encrypts provider keys at rest (default:
                             a key file ``secret.key`` in the data directory, made with mode
                             0600 on first run)
    PARLEY_SESSION_HOURS     web session lifetime (default 168: a week)
    PARLEY_MAX_UPLOAD_BYTES  attachment size limit, 413 above it (default 20 MiB)
    PARLEY_ENV               production (default: a migration without a verified backup is
                             refused) or development (it is logged and goes ahead)
    PARLEY_SHUTDOWN_GRACE    seconds open streams get to finish on SIGTERM (default 30)
    PARLEY_BACKUP_DIR        where backups go (default ``<data dir>/backups``)
    PARLEY_BACKUP_FALLBACK_DIR  used when the backup directory is not writable (default
                             ``~/.local/state/parley/backups``)
    PARLEY_BACKUP_INTERVAL_HOURS  scheduled backups inside the server (default 0: none)
    PARLEY_BACKUP_KEEP       scheduled backups kept by pruning (default 7)
    PARLEY_BACKUP_KEY        when set, backups are encrypted with a key derived from it
    PARLEY_RETENTION_REQUEST_LOG_DAYS   request-log rows older than this are deleted
                             (default 0: kept forever; conversations are never touched)
    PARLEY_RETENTION_HTTP_METRICS_DAYS  the same for HTTP metrics (default 30)
    PARLEY_MAINTENANCE_INTERVAL_HOURS   scheduled ``parley maintenance`` (default 0: none)
    PARLEY_HTTP_METRICS_SAMPLE  share of HTTP requests recorded in ``http_metrics``
                             (default 1.0: all; 0 records none; Prometheus counts all)
    PARLEY_SEARCH_EMBEDDER   local (default: all-MiniLM-L6-v2 on this machine, the
                             ``embeddings`` extra), remote (``[search] model`` through the
                             gateway's providers) or none (keyword search only)
    PARLEY_SEARCH_MODEL      the gateway model id of the remote embedder
    PARLEY_VECTOR_URI        where the vectors live: a directory (default
                             ``<data dir>/vectors``) or any LanceDB URI (``s3://...``)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from parley.domain.capabilities import capabilities_from
from parley.errors import ConfigError
from parley.settings import sections as s
from parley.settings.values import (
    KIND_DEFAULTS,
    PROVIDER_KINDS,
    Backups,
    ProviderConfig,
    Retention,
    RetryPolicy,
    SearchSettings,
    Secret,
    Settings,
    Timeouts,
)

__all__ = [
    "KIND_DEFAULTS",
    "PROVIDER_KINDS",
    "Backups",
    "ProviderConfig",
    "Retention",
    "RetryPolicy",
    "SearchSettings",
    "Secret",
    "Settings",
    "Timeouts",
    "load_settings",
]


def load_settings(
    env: Mapping[str, str] | None = None, cwd: Path | None = None, **overrides: Any
) -> Settings:
    """Build ``Settings`` from ``env`` (default ``os.environ``) and the config file."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    config_path = _config_path(env, cwd)
    config = _read_toml(config_path) if config_path else {}
    s.unknown_keys(config, _TABLES, "config")
    server = s.section(config, "server")
    s.unknown_keys(server, _SERVER_FIELDS, "config: [server]")

    data_dir = Path(env.get("PARLEY_DATA_DIR") or server.get("data_dir") or cwd / "data")
    if not data_dir.is_absolute():
        data_dir = cwd / data_dir
    database_url = env.get("DATABASE_URL") or str(
        server.get("database_url") or f"sqlite:///{data_dir / 'parley.db'}"
    )
    master = env.get("PARLEY_MASTER_KEY") or server.get("master_key")
    timeouts = s.read_timeouts(s.section(config, "timeouts"), Timeouts())
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": _normalise_db_url(database_url),
        "config_path": config_path,
        "master_key": s.master_key(master),
        "host": env.get("PARLEY_HOST") or str(server.get("host", "127.0.0.1")),
        "port": s.integer(env.get("PARLEY_PORT") or server.get("port", 8000), "port"),
        "max_body_bytes": s.integer(
            env.get("PARLEY_MAX_BODY_BYTES") or server.get("max_body_bytes", 10 * 1024 * 1024),
            "max_body_bytes",
        ),
        "sqlite_synchronous": s.choice(
            env.get("PARLEY_SQLITE_SYNCHRONOUS") or server.get("sqlite_synchronous", "NORMAL"),
            ("FULL", "NORMAL", "EXTRA"),
            "sqlite_synchronous",
        ).upper(),
        "recording": s.choice(
            env.get("PARLEY_RECORDING") or server.get("recording", "durable"),
            ("durable", "journal", "async"),
            "recording",
        ),
        "writer": s.choice(
            env.get("PARLEY_WRITER") or server.get("writer", "thread"),
            ("thread", "process"),
            "writer",
        ),
        "log_level": (env.get("PARLEY_LOG_LEVEL") or str(server.get("log_level", "INFO"))).upper(),
        "providers": tuple(
            s.read_provider(p, env, timeouts) for p in s.section_list(config, "providers")
        ),
        "aliases": s.read_aliases(s.section(config, "aliases")),
        "pricing": s.read_pricing(s.section(config, "pricing")),
        "retry": s.read_retry(s.section(config, "retry")),
        "timeouts": timeouts,
        "capabilities": capabilities_from(s.section(config, "capabilities"), "capabilities"),
        "models_ttl": s.number(server.get("models_ttl", 300.0), "models_ttl"),
        "secret_key": s.secret(env.get("PARLEY_SECRET_KEY") or server.get("secret_key")),
        "session_hours": s.number(
            env.get("PARLEY_SESSION_HOURS") or server.get("session_hours", 168.0), "session_hours"
        ),
        "max_upload_bytes": s.integer(
            env.get("PARLEY_MAX_UPLOAD_BYTES") or server.get("max_upload_bytes", 20 * 1024 * 1024),
            "max_upload_bytes",
        ),
        "environment": s.choice(
            env.get("PARLEY_ENV") or server.get("environment", "production"),
            ("production", "development"),
            "environment",
        ).lower(),
        "shutdown_grace": s.number(
            env.get("PARLEY_SHUTDOWN_GRACE") or server.get("shutdown_grace", 30.0),
            "shutdown_grace",
        ),
        "backups": s.read_backups(s.section(config, "backup"), env, data_dir, cwd),
        "retention": s.read_retention(s.section(config, "retention"), env),
        "maintenance_interval_hours": s.number(
            env.get("PARLEY_MAINTENANCE_INTERVAL_HOURS")
            or s.section(config, "maintenance").get("interval_hours", 0.0),
            "maintenance.interval_hours",
        ),
        "http_metrics_sample": s.share(
            env.get("PARLEY_HTTP_METRICS_SAMPLE")
            or s.section(config, "http_metrics").get("sample", 1.0),
            "http_metrics.sample",
        ),
        "http_metrics_body_bytes": s.integer(
            s.section(config, "http_metrics").get("body_bytes", 4096), "http_metrics.body_bytes"
        ),
        "search": s.read_search(s.section(config, "search"), env, cwd),
    }
    values.update(overrides)
    settings = Settings(**values)
    _check_names(settings)
    _check_server(settings)
    return settings


# The config file's tables, and the [server] table's settings: anything else is a typo.
_TABLES = {
    "server", "timeouts", "providers", "aliases", "pricing", "retry", "capabilities",
    "backup", "retention", "maintenance", "http_metrics", "search",
}  # fmt: skip
_SERVER_FIELDS = {
    "data_dir", "database_url", "master_key", "host", "port", "max_body_bytes",
    "sqlite_synchronous", "recording", "writer", "log_level", "models_ttl", "secret_key",
    "session_hours", "max_upload_bytes", "environment", "shutdown_grace",
}  # fmt: skip
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check_server(settings: Settings) -> None:
    """Values that would start a server that fails every request or listens elsewhere."""
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"port must be from 0 to 65535, got {settings.port}")
    for name in ("max_body_bytes", "max_upload_bytes"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.log_level not in _LOG_LEVELS:
        raise ConfigError(
            f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {settings.log_level!r}"
        )
    _check_database_url(settings.database_url)


def _check_database_url(url: str) -> None:
    """A URL SQLAlchemy can use, for a database parley can keep. The message never
    repeats the URL: it may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - a port that is not a number raises here
    except (ArgumentError, ValueError):
        raise ConfigError(
            "DATABASE_URL is not a database URL: expected sqlite:///<path> or "
            "postgresql://<user>@<host>:<port>/<database>"
        ) from None
    if parsed.host is not None and "@" in parsed.host:
        raise ConfigError(
            "DATABASE_URL: the part after the first '@' holds another '@'; write an '@' "
            "in the password as %40"
        )


def in_memory(settings: Settings) -> bool:
    """Whether the database is SQLite in memory: fine for a one-off command, never for a
    server (each of its connections would see a database of its own)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_url)
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _config_path(env: Mapping[str, str], cwd: Path) -> Path | None:
    explicit = env.get("PARLEY_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"PARLEY_CONFIG names {path}, which is not a file")
        return path
    default = cwd / "parley.toml"
    return default if default.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None


def _normalise_db_url(url: str) -> str:
    # Plain postgres URLs get the psycopg 3 driver, the one parley ships with.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _check_names(settings: Settings) -> None:
    names = [p.name for p in settings.providers]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"duplicate provider name(s): {', '.join(sorted(duplicates))}")
    for alias, targets in settings.aliases.items():
        if "/" in alias:
            raise ConfigError(f"alias {alias}: an alias may not contain '/'")
        for target in targets:
            if target.split("/", 1)[0] not in names:
                raise ConfigError(f"alias {alias}: unknown provider in {target!r}")
