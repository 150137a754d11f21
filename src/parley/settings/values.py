"""The settings' values: ``Settings`` and the parts it is made of, immutable once built.

Only ``parley.settings`` builds them from the environment and the config file (tests and
tools may build them directly). ``Secret`` holds provider keys, the master key and other
secrets so that no ``repr``, log line or error message can show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from parley.domain.capabilities import Capabilities
from parley.domain.usage import Price

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
        return Backups(dir=self.data_dir / "backups", fallback_dir=default_fallback_dir())

    @property
    def journal_dir(self) -> Path:
        """Journal recording's segments (``store.journal``); replayed at every start."""
        return self.data_dir / "journal"

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


def default_fallback_dir() -> Path:
    return Path.home() / ".local" / "state" / "parley" / "backups"
