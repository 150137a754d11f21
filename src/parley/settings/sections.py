"""Reading one section of the config file (with its environment overrides), for
``parley.settings``: every check of a value's type, range or name lives here, and every
failure is a ``ConfigError`` that names the setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from parley.domain.usage import Price
from parley.errors import ConfigError
from parley.settings.values import (
    KIND_DEFAULTS,
    PROVIDER_KINDS,
    Backups,
    ProviderConfig,
    Retention,
    RetryPolicy,
    SearchSettings,
    Secret,
    Timeouts,
    default_fallback_dir,
)


def resolve_path(value: Any, cwd: Path) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else cwd / path


def share(value: Any, name: str) -> float:
    share = number(value, name)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {share}")
    return share


def nonnegative(value: float, name: str) -> float:
    # "nan" and "inf" parse as floats: neither is an interval or a size.
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number, not negative, got {value}")
    return value


# A century: older data is kept forever in all but name, and larger ages overflow the
# date arithmetic of a retention pass (datetime.min is year 1).
MAX_DAYS = 36_500


def days(value: Any, name: str) -> float:
    """An age in days, from 0 to ``MAX_DAYS``; "nan" and "inf" parse as floats but are
    not ages."""
    age = number(value, name)
    if not math.isfinite(age) or not 0 <= age <= MAX_DAYS:
        raise ConfigError(f"{name} must be a number of days from 0 to {MAX_DAYS}, got {value!r}")
    return age


def secret(value: Any) -> Secret | None:
    return Secret(str(value)) if value else None


# The master key is the admin's bearer credential, guessed over HTTP if it is short.
MIN_MASTER_KEY_LENGTH = 16


def master_key(value: Any) -> Secret | None:
    """The master key, refused (without echoing it) when shorter than 16 characters."""
    key = secret(value)
    if key is not None and len(key.get()) < MIN_MASTER_KEY_LENGTH:
        raise ConfigError(
            f"PARLEY_MASTER_KEY must be at least {MIN_MASTER_KEY_LENGTH} characters long; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


def section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config: [{key}] must be a table")
    return value


def section_list(config: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"config: [[{key}]] must be an array of tables")
    return value


def integer(value: Any, name: str) -> int:
    """An integer from the config file, or the text of one from the environment; a
    boolean or a fraction is refused, not rounded (``port = true`` is no port 1)."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from exc


def number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc


def flag(value: Any, name: str) -> bool:
    """A boolean: ``true`` / ``false`` in the config file; in the environment also 1, 0,
    yes, no, on, off. ``"false"`` is never true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def unknown_keys(table: Mapping[str, Any], known: set[str], where: str) -> None:
    """Refuse a misspelt setting (``api_kye``) rather than run without it."""
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")


def choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    text = str(value)
    if text.upper() not in {c.upper() for c in choices}:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text if text in choices else text.lower() if text.lower() in choices else text


def read_timeouts(table: Mapping[str, Any], base: Timeouts) -> Timeouts:
    known = {"connect", "first_byte", "idle", "total"}
    unknown_keys(table, known, "timeouts")
    values = {k: number(table.get(k, getattr(base, k)), f"timeouts.{k}") for k in sorted(known)}
    for key, value in values.items():
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"timeouts.{key} must be a positive number of seconds, got {value}")
    return Timeouts(**values)


def read_retry(table: Mapping[str, Any]) -> RetryPolicy:
    base = RetryPolicy()
    return RetryPolicy(
        attempts=integer(table.get("attempts", base.attempts), "retry.attempts"),
        backoff_base=number(table.get("backoff_base", base.backoff_base), "retry.backoff_base"),
        backoff_max=number(table.get("backoff_max", base.backoff_max), "retry.backoff_max"),
        max_retry_after=number(
            table.get("max_retry_after", base.max_retry_after), "retry.max_retry_after"
        ),
    )


def read_provider(
    table: Mapping[str, Any], env: Mapping[str, str], timeouts: Timeouts
) -> ProviderConfig:
    name = table.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"provider name must be a non-empty string without '/': {name!r}")
    unknown_keys(table, PROVIDER_FIELDS, f"provider {name}")
    kind = table.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise ConfigError(
            f"provider {name}: kind must be one of {', '.join(sorted(PROVIDER_KINDS))}"
        )
    default_url, default_key_env = KIND_DEFAULTS[kind]
    base_url = table.get("base_url", default_url)
    _check_url(base_url, f"provider {name}: base_url")
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
        timeouts=read_timeouts(table.get("timeouts", {}), timeouts),
        stream_usage=flag(table.get("stream_usage", True), f"provider {name}: stream_usage"),
        list_models=flag(table.get("list_models", True), f"provider {name}: list_models"),
    )


PROVIDER_FIELDS = {
    "name", "kind", "base_url", "api_key", "api_key_env", "models", "headers", "timeouts",
    "stream_usage", "list_models",
}  # fmt: skip


def _check_url(url: Any, name: str) -> None:
    """An http(s) URL with a host, a valid port and no user or password in it (aiohttp
    refuses those on every request; put a key in api_key or headers)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port out of range or not a number
    except ValueError:
        raise ConfigError(f"{name} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"{name} must name a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{name} must not hold a user or password: use api_key or headers")


def read_aliases(table: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
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


def read_pricing(table: Mapping[str, Any]) -> dict[str, Price]:
    out: dict[str, Price] = {}
    for model, price in table.items():
        if not isinstance(price, dict) or "input" not in price or "output" not in price:
            raise ConfigError(f"pricing.{model}: needs input and output (USD per 1M tokens)")
        cached = price.get("cached_input")
        out[model] = Price(
            input=number(price["input"], f"pricing.{model}.input"),
            output=number(price["output"], f"pricing.{model}.output"),
            cached_input=None if cached is None else number(cached, f"pricing.{model}.cached"),
        )
    return out


def read_backups(
    table: Mapping[str, Any], env: Mapping[str, str], data_dir: Path, cwd: Path
) -> Backups:
    known = {"dir", "fallback_dir", "interval_hours", "keep", "encryption_key"}
    unknown_keys(table, known, "backup")
    directory = env.get("PARLEY_BACKUP_DIR") or table.get("dir")
    fallback = env.get("PARLEY_BACKUP_FALLBACK_DIR") or table.get("fallback_dir")
    keep = integer(env.get("PARLEY_BACKUP_KEEP") or table.get("keep", 7), "backup.keep")
    if keep < 1:
        raise ConfigError(f"backup.keep must be at least 1, got {keep}")
    return Backups(
        dir=resolve_path(directory, cwd) if directory else data_dir / "backups",
        fallback_dir=resolve_path(fallback, cwd) if fallback else default_fallback_dir(),
        interval_hours=nonnegative(
            number(
                env.get("PARLEY_BACKUP_INTERVAL_HOURS") or table.get("interval_hours", 0.0),
                "backup.interval_hours",
            ),
            "backup.interval_hours",
        ),
        keep=keep,
        encryption_key=secret(env.get("PARLEY_BACKUP_KEY") or table.get("encryption_key")),
    )


def read_retention(table: Mapping[str, Any], env: Mapping[str, str]) -> Retention:
    known = {"request_log_days", "http_metrics_days", "batch_size", "interval_hours"}
    unknown_keys(table, known, "retention")
    base = Retention()
    batch = integer(table.get("batch_size", base.batch_size), "retention.batch_size")
    if batch < 1:
        raise ConfigError(f"retention.batch_size must be at least 1, got {batch}")
    return Retention(
        request_log_days=days(
            env.get("PARLEY_RETENTION_REQUEST_LOG_DAYS")
            or table.get("request_log_days", base.request_log_days),
            "retention.request_log_days",
        ),
        http_metrics_days=days(
            env.get("PARLEY_RETENTION_HTTP_METRICS_DAYS")
            or table.get("http_metrics_days", base.http_metrics_days),
            "retention.http_metrics_days",
        ),
        batch_size=batch,
        interval_hours=nonnegative(
            number(table.get("interval_hours", base.interval_hours), "retention.interval_hours"),
            "retention.interval_hours",
        ),
    )


def read_search(table: Mapping[str, Any], env: Mapping[str, str], cwd: Path) -> SearchSettings:
    known = {
        "embedder", "model", "vector_uri", "batch_size", "poll_seconds", "ann_min_rows",
        "reconcile_on_start",
    }  # fmt: skip
    unknown_keys(table, known, "search")
    base = SearchSettings()
    embedder = choice(
        env.get("PARLEY_SEARCH_EMBEDDER") or table.get("embedder", base.embedder),
        ("local", "remote", "none"),
        "search.embedder",
    ).lower()
    model = env.get("PARLEY_SEARCH_MODEL") or table.get("model")
    if embedder == "remote" and not model:
        raise ConfigError("search.embedder = 'remote' needs search.model (a gateway model id)")
    uri = env.get("PARLEY_VECTOR_URI") or table.get("vector_uri")
    if uri and "://" not in str(uri):
        uri = str(resolve_path(uri, cwd))
    batch = integer(table.get("batch_size", base.batch_size), "search.batch_size")
    if batch < 1:
        raise ConfigError(f"search.batch_size must be at least 1, got {batch}")
    return SearchSettings(
        embedder=embedder,
        model=str(model) if model else None,
        vector_uri=str(uri) if uri else None,
        batch_size=batch,
        poll_seconds=nonnegative(
            number(table.get("poll_seconds", base.poll_seconds), "search.poll_seconds"),
            "search.poll_seconds",
        ),
        ann_min_rows=integer(table.get("ann_min_rows", base.ann_min_rows), "search.ann_min_rows"),
        reconcile_on_start=flag(
            table.get("reconcile_on_start", base.reconcile_on_start), "search.reconcile_on_start"
        ),
    )
