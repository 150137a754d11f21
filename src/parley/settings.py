"""Settings: the only module that reads environment variables and the config file.

``load_settings()`` reads the environment and the TOML config once and returns an
immutable ``Settings``; everything else receives it explicitly. Environment variables
override the file. Provider API keys are held in ``Secret`` so that no ``repr``, log line
or error message can show them.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parley.domain.capabilities import Capabilities, capabilities_from
from parley.domain.usage import Price
from parley.errors import ConfigError

PROVIDER_KINDS = frozenset({"openai", "anthropic", "gemini", "ollama", "huggingface"})

# Per kind: the public endpoint used when ``base_url`` is not given, and the environment
# variable a key is read from when neither ``api_key`` nor ``api_key_env`` is given (a
# variable that is not set then means no key, not an error).
KIND_DEFAULTS: Mapping[str, tuple[str, str | None]] = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta", "GEMINI_API_KEY"),
    "ollama": ("http://127.0.0.1:11434", None),
    # Hugging Face's Inference Providers router speaks OpenAI's chat route; TGI and
    # Inference Endpoints do too, at their own ``.../v1``.
    "huggingface": ("https://router.huggingface.co/v1", "HF_TOKEN"),
}


class Secret:
    """A string that never shows itself in ``repr``/``str``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``first_byte`` covers the wait for response headers and the first chunk;
    ``idle`` the longest silence between chunks of a stream; ``total`` a whole attempt."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries per candidate before falling back to the next one."""

    attempts: int = 2
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    # A Retry-After longer than this is not waited for; the next candidate is tried instead.
    max_retry_after: float = 30.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: str
    base_url: str
    api_key: Secret | None = None
    models: tuple[str, ...] = ()
    # May carry credentials (custom auth headers): kept out of repr.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Ask the upstream for usage in streams (stream_options.include_usage).
    stream_usage: bool = True
    # Merge the upstream's own model list into /v1/models.
    list_models: bool = True


@dataclass(frozen=True, slots=True)
class Backups:
    """Where backups go, how often the server takes them, and how they are protected."""

    dir: Path
    fallback_dir: Path
    # Hours between scheduled backups taken by the server; 0 takes none.
    interval_hours: float = 0.0
    # How many archives ``parley backup prune`` (and the schedule) keeps.
    keep: int = 7
    # When set, archives are encrypted with a key derived from this secret.
    encryption_key: Secret | None = None


@dataclass(frozen=True, slots=True)
class Retention:
    """How long raw measurements are kept (days; 0 keeps them forever). Conversations,
    messages and rollups are never touched by retention."""

    request_log_days: float = 0.0
    http_metrics_days: float = 30.0
    # Rows deleted per transaction, so the writer is never blocked for long (measured with
    # bench/retention_bench.py: 1,000 keeps /v1's p99 within 1.2x of idle, 2,000 did not).
    batch_size: int = 1000
    # Hours between the server's retention passes.
    interval_hours: float = 1.0


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """Semantic search (``parley.search``): the embedder, the vector store, the indexer."""

    # "local", "remote" or "none" (see PARLEY_SEARCH_EMBEDDER).
    embedder: str = "local"
    # The remote embedder's model, as a client names it on /v1/embeddings ("openai/x", an alias).
    model: str | None = None
    # None: ``<data dir>/vectors``.
    vector_uri: str | None = None
    # Items embedded per batch, and the pause of the indexer when the outbox is empty.
    batch_size: int = 64
    poll_seconds: float = 1.0
    # A table gets an ANN index (IVF-PQ) once it holds this many vectors; below, exact search.
    ann_min_rows: int = 100_000
    # Server start compares rows and vectors and queues what is missing (``parley reindex``).
    reconcile_on_start: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    database_url: str
    config_path: Path | None = None
    master_key: Secret | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 10 * 1024 * 1024
    sqlite_synchronous: str = "NORMAL"
    recording: str = "durable"
    writer: str = "thread"
    log_level: str = "INFO"
    providers: tuple[ProviderConfig, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pricing: Mapping[str, Price] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    writer_batch_max: int = 512
    capabilities: Mapping[str, Capabilities] = field(default_factory=dict)
    secret_key: Secret | None = None
    session_hours: float = 168.0
    max_upload_bytes: int = 20 * 1024 * 1024
    # How long a provider's own model list (``/v1/models``) is reused before asking again.
    models_ttl: float = 300.0
    environment: str = "production"
    shutdown_grace: float = 30.0
    backups: Backups | None = None
    retention: Retention = field(default_factory=Retention)
    # Hours between scheduled maintenance runs (VACUUM, ANALYZE, integrity report); 0: none.
    maintenance_interval_hours: float = 0.0
    search: SearchSettings = field(default_factory=SearchSettings)
    # Share of HTTP requests recorded in ``http_metrics``, and how much of a body is kept.
    http_metrics_sample: float = 1.0
    http_metrics_body_bytes: int = 4096

    @property
    def backup(self) -> Backups:
        """The backup settings (defaults under the data directory when not configured)."""
        if self.backups is not None:
            return self.backups
        return Backups(dir=self.data_dir / "backups", fallback_dir=_default_fallback_dir())

    @property
    def secret_key_file(self) -> Path:
        """Where the master secret is kept when ``PARLEY_SECRET_KEY`` is not set."""
        return self.data_dir / "secret.key"

    @property
    def blob_dir(self) -> Path:
        """The content-addressed store of attachment and document bytes."""
        return self.data_dir / "blobs"

    @property
    def vector_uri(self) -> str:
        """Where the vector store lives (a directory or a LanceDB URI)."""
        return self.search.vector_uri or str(self.data_dir / "vectors")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def provider(self, name: str) -> ProviderConfig | None:
        for provider in self.providers:
            if provider.name == name:
                return provider
        return None


def load_settings(
    env: Mapping[str, str] | None = None, cwd: Path | None = None, **overrides: Any
) -> Settings:
    """Build ``Settings`` from ``env`` (default ``os.environ``) and the config file."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    config_path = _config_path(env, cwd)
    config = _read_toml(config_path) if config_path else {}
    server = _table(config, "server")

    data_dir = Path(env.get("PARLEY_DATA_DIR") or server.get("data_dir") or cwd / "data")
    if not data_dir.is_absolute():
        data_dir = cwd / data_dir
    database_url = env.get("DATABASE_URL") or str(
        server.get("database_url") or f"sqlite:///{data_dir / 'parley.db'}"
    )
    master = env.get("PARLEY_MASTER_KEY") or server.get("master_key")
    timeouts = _timeouts(_table(config, "timeouts"), Timeouts())
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": _normalise_db_url(database_url),
        "config_path": config_path,
        "master_key": Secret(str(master)) if master else None,
        "host": env.get("PARLEY_HOST") or str(server.get("host", "127.0.0.1")),
        "port": _int(env.get("PARLEY_PORT") or server.get("port", 8000), "port"),
        "max_body_bytes": _int(
            env.get("PARLEY_MAX_BODY_BYTES") or server.get("max_body_bytes", 10 * 1024 * 1024),
            "max_body_bytes",
        ),
        "sqlite_synchronous": _choice(
            env.get("PARLEY_SQLITE_SYNCHRONOUS") or server.get("sqlite_synchronous", "NORMAL"),
            ("FULL", "NORMAL", "EXTRA"),
            "sqlite_synchronous",
        ).upper(),
        "recording": _choice(
            env.get("PARLEY_RECORDING") or server.get("recording", "durable"),
            ("durable", "async"),
            "recording",
        ),
        "writer": _choice(
            env.get("PARLEY_WRITER") or server.get("writer", "thread"),
            ("thread", "process"),
            "writer",
        ),
        "log_level": (env.get("PARLEY_LOG_LEVEL") or str(server.get("log_level", "INFO"))).upper(),
        "providers": tuple(_provider(p, env, timeouts) for p in _list(config, "providers")),
        "aliases": _aliases(_table(config, "aliases")),
        "pricing": _pricing(_table(config, "pricing")),
        "retry": _retry(_table(config, "retry")),
        "timeouts": timeouts,
        "capabilities": capabilities_from(_table(config, "capabilities"), "capabilities"),
        "models_ttl": _float(server.get("models_ttl", 300.0), "models_ttl"),
        "secret_key": _secret(env.get("PARLEY_SECRET_KEY") or server.get("secret_key")),
        "session_hours": _float(
            env.get("PARLEY_SESSION_HOURS") or server.get("session_hours", 168.0), "session_hours"
        ),
        "max_upload_bytes": _int(
            env.get("PARLEY_MAX_UPLOAD_BYTES") or server.get("max_upload_bytes", 20 * 1024 * 1024),
            "max_upload_bytes",
        ),
        "environment": _choice(
            env.get("PARLEY_ENV") or server.get("environment", "production"),
            ("production", "development"),
            "environment",
        ).lower(),
        "shutdown_grace": _float(
            env.get("PARLEY_SHUTDOWN_GRACE") or server.get("shutdown_grace", 30.0),
            "shutdown_grace",
        ),
        "backups": _backups(_table(config, "backup"), env, data_dir, cwd),
        "retention": _retention(_table(config, "retention"), env),
        "maintenance_interval_hours": _float(
            env.get("PARLEY_MAINTENANCE_INTERVAL_HOURS")
            or _table(config, "maintenance").get("interval_hours", 0.0),
            "maintenance.interval_hours",
        ),
        "http_metrics_sample": _share(
            env.get("PARLEY_HTTP_METRICS_SAMPLE")
            or _table(config, "http_metrics").get("sample", 1.0),
            "http_metrics.sample",
        ),
        "http_metrics_body_bytes": _int(
            _table(config, "http_metrics").get("body_bytes", 4096), "http_metrics.body_bytes"
        ),
        "search": _search(_table(config, "search"), env, cwd),
    }
    values.update(overrides)
    settings = Settings(**values)
    _check_names(settings)
    return settings


def _default_fallback_dir() -> Path:
    return Path.home() / ".local" / "state" / "parley" / "backups"


def _path(value: Any, cwd: Path) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else cwd / path


def _share(value: Any, name: str) -> float:
    share = _float(value, name)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {share}")
    return share


def _nonnegative(value: float, name: str) -> float:
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def _backups(
    table: Mapping[str, Any], env: Mapping[str, str], data_dir: Path, cwd: Path
) -> Backups:
    unknown = set(table) - {"dir", "fallback_dir", "interval_hours", "keep", "encryption_key"}
    if unknown:
        raise ConfigError(f"unknown backup setting(s): {', '.join(sorted(unknown))}")
    directory = env.get("PARLEY_BACKUP_DIR") or table.get("dir")
    fallback = env.get("PARLEY_BACKUP_FALLBACK_DIR") or table.get("fallback_dir")
    keep = _int(env.get("PARLEY_BACKUP_KEEP") or table.get("keep", 7), "backup.keep")
    if keep < 1:
        raise ConfigError(f"backup.keep must be at least 1, got {keep}")
    return Backups(
        dir=_path(directory, cwd) if directory else data_dir / "backups",
        fallback_dir=_path(fallback, cwd) if fallback else _default_fallback_dir(),
        interval_hours=_nonnegative(
            _float(
                env.get("PARLEY_BACKUP_INTERVAL_HOURS") or table.get("interval_hours", 0.0),
                "backup.interval_hours",
            ),
            "backup.interval_hours",
        ),
        keep=keep,
        encryption_key=_secret(env.get("PARLEY_BACKUP_KEY") or table.get("encryption_key")),
    )


def _retention(table: Mapping[str, Any], env: Mapping[str, str]) -> Retention:
    known = {"request_log_days", "http_metrics_days", "batch_size", "interval_hours"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown retention setting(s): {', '.join(sorted(unknown))}")
    base = Retention()
    batch = _int(table.get("batch_size", base.batch_size), "retention.batch_size")
    if batch < 1:
        raise ConfigError(f"retention.batch_size must be at least 1, got {batch}")
    return Retention(
        request_log_days=_nonnegative(
            _float(
                env.get("PARLEY_RETENTION_REQUEST_LOG_DAYS")
                or table.get("request_log_days", base.request_log_days),
                "retention.request_log_days",
            ),
            "retention.request_log_days",
        ),
        http_metrics_days=_nonnegative(
            _float(
                env.get("PARLEY_RETENTION_HTTP_METRICS_DAYS")
                or table.get("http_metrics_days", base.http_metrics_days),
                "retention.http_metrics_days",
            ),
            "retention.http_metrics_days",
        ),
        batch_size=batch,
        interval_hours=_nonnegative(
            _float(table.get("interval_hours", base.interval_hours), "retention.interval_hours"),
            "retention.interval_hours",
        ),
    )


def _search(table: Mapping[str, Any], env: Mapping[str, str], cwd: Path) -> SearchSettings:
    known = {
        "embedder", "model", "vector_uri", "batch_size", "poll_seconds", "ann_min_rows",
        "reconcile_on_start",
    }  # fmt: skip
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown search setting(s): {', '.join(sorted(unknown))}")
    base = SearchSettings()
    embedder = _choice(
        env.get("PARLEY_SEARCH_EMBEDDER") or table.get("embedder", base.embedder),
        ("local", "remote", "none"),
        "search.embedder",
    ).lower()
    model = env.get("PARLEY_SEARCH_MODEL") or table.get("model")
    if embedder == "remote" and not model:
        raise ConfigError("search.embedder = 'remote' needs search.model (a gateway model id)")
    uri = env.get("PARLEY_VECTOR_URI") or table.get("vector_uri")
    if uri and "://" not in str(uri):
        uri = str(_path(uri, cwd))
    batch = _int(table.get("batch_size", base.batch_size), "search.batch_size")
    if batch < 1:
        raise ConfigError(f"search.batch_size must be at least 1, got {batch}")
    return SearchSettings(
        embedder=embedder,
        model=str(model) if model else None,
        vector_uri=str(uri) if uri else None,
        batch_size=batch,
        poll_seconds=_nonnegative(
            _float(table.get("poll_seconds", base.poll_seconds), "search.poll_seconds"),
            "search.poll_seconds",
        ),
        ann_min_rows=_int(table.get("ann_min_rows", base.ann_min_rows), "search.ann_min_rows"),
        reconcile_on_start=bool(table.get("reconcile_on_start", base.reconcile_on_start)),
    )


def _secret(value: Any) -> Secret | None:
    return Secret(str(value)) if value else None


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


def _table(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: [{key}] must be a table")
    return value


def _list(config: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"config: [[{key}]] must be an array of tables")
    return value


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from exc


def _float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc


def _choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    text = str(value)
    if text.upper() not in {c.upper() for c in choices}:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text if text in choices else text.lower() if text.lower() in choices else text


def _normalise_db_url(url: str) -> str:
    # Plain postgres URLs get the psycopg 3 driver, the one parley ships with.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _timeouts(table: Mapping[str, Any], base: Timeouts) -> Timeouts:
    known = {"connect", "first_byte", "idle", "total"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown timeout setting(s): {', '.join(sorted(unknown))}")
    return Timeouts(
        **{k: _float(table.get(k, getattr(base, k)), f"timeouts.{k}") for k in sorted(known)}
    )


def _retry(table: Mapping[str, Any]) -> RetryPolicy:
    base = RetryPolicy()
    return RetryPolicy(
        attempts=_int(table.get("attempts", base.attempts), "retry.attempts"),
        backoff_base=_float(table.get("backoff_base", base.backoff_base), "retry.backoff_base"),
        backoff_max=_float(table.get("backoff_max", base.backoff_max), "retry.backoff_max"),
        max_retry_after=_float(
            table.get("max_retry_after", base.max_retry_after), "retry.max_retry_after"
        ),
    )


def _provider(
    table: Mapping[str, Any], env: Mapping[str, str], timeouts: Timeouts
) -> ProviderConfig:
    name = table.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"provider name must be a non-empty string without '/': {name!r}")
    kind = table.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise ConfigError(
            f"provider {name}: kind must be one of {', '.join(sorted(PROVIDER_KINDS))}"
        )
    default_url, default_key_env = KIND_DEFAULTS[kind]
    base_url = table.get("base_url", default_url)
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"provider {name}: base_url must be an http(s) URL")
    key: str | None = None
    if "api_key_env" in table:
        key = env.get(str(table["api_key_env"]))
        if key is None:
            raise ConfigError(
                f"provider {name}: environment variable {table['api_key_env']} is not set"
            )
    elif "api_key" in table:
        key = str(table["api_key"])
    elif default_key_env is not None:
        key = env.get(default_key_env)
    models = table.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"provider {name}: models must be a list of strings")
    headers = table.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError(f"provider {name}: headers must be a table")
    return ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        api_key=Secret(key) if key else None,
        models=tuple(models),
        headers={str(k): str(v) for k, v in headers.items()},
        timeouts=_timeouts(table.get("timeouts", {}), timeouts),
        stream_usage=bool(table.get("stream_usage", True)),
        list_models=bool(table.get("list_models", True)),
    )


def _aliases(table: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for alias, targets in table.items():
        if isinstance(targets, str):
            targets = [targets]
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(t, str) and "/" in t for t in targets)
        ):
            raise ConfigError(f"alias {alias}: must be a non-empty list of 'provider/model' ids")
        out[alias] = tuple(targets)
    return out


def _pricing(table: Mapping[str, Any]) -> dict[str, Price]:
    out: dict[str, Price] = {}
    for model, price in table.items():
        if not isinstance(price, dict) or "input" not in price or "output" not in price:
            raise ConfigError(f"pricing.{model}: needs input and output (USD per 1M tokens)")
        cached = price.get("cached_input")
        out[model] = Price(
            input=_float(price["input"], f"pricing.{model}.input"),
            output=_float(price["output"], f"pricing.{model}.output"),
            cached_input=None if cached is None else _float(cached, f"pricing.{model}.cached"),
        )
    return out


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
