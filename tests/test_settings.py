"""Settings: defaults per provider kind, keys from the environment, clear config errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parley.errors import ConfigError
from parley.settings import KIND_DEFAULTS, load_settings


def _load(tmp_path: Path, toml: str) -> object:
    config = tmp_path / "parley.toml"
    config.write_text(toml)
    return load_settings(env={"PARLEY_CONFIG": str(config)}, cwd=tmp_path)


def test_each_kind_has_a_default_endpoint_and_key_variable(tmp_path: Path) -> None:
    toml = "".join(f'[[providers]]\nname = "{kind}"\nkind = "{kind}"\n' for kind in KIND_DEFAULTS)
    (tmp_path / "parley.toml").write_text(toml)
    settings = load_settings(
        env={
            "PARLEY_CONFIG": str(tmp_path / "parley.toml"),
            "ANTHROPIC_API_KEY": "sk-ant-canary",
            "HF_TOKEN": "hf_canary_token",
        },
        cwd=tmp_path,
    )
    by_name = {p.name: p for p in settings.providers}
    assert by_name["gemini"].base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert by_name["ollama"].base_url == "http://127.0.0.1:11434"
    assert by_name["huggingface"].base_url == "https://router.huggingface.co/v1"
    anthropic_key = by_name["anthropic"].api_key
    assert anthropic_key is not None and anthropic_key.get() == "sk-ant-canary"
    hf_key = by_name["huggingface"].api_key
    assert hf_key is not None and hf_key.get() == "hf_canary_token"
    # A default variable that is not set means no key, not an error.
    assert by_name["openai"].api_key is None and by_name["gemini"].api_key is None
    # Keys never show in a repr.
    assert "canary" not in repr(settings)


def test_an_explicit_key_variable_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MISSING_KEY is not set"):
        _load(
            tmp_path, '[[providers]]\nname = "a"\nkind = "anthropic"\napi_key_env = "MISSING_KEY"\n'
        )


def test_the_master_key_has_sixteen_characters_or_more(tmp_path: Path) -> None:
    for source in ({"PARLEY_MASTER_KEY": "x" * 15}, {}):
        (tmp_path / "parley.toml").write_text('[server]\nmaster_key = "yyyyyyyyyyyyyyy"\n')
        with pytest.raises(ConfigError, match="at least 16 characters") as caught:
            load_settings(env=source, cwd=tmp_path)
        assert "xxx" not in str(caught.value) and "yyy" not in str(caught.value)
    (tmp_path / "parley.toml").unlink()
    settings = load_settings(env={"PARLEY_MASTER_KEY": "x" * 16}, cwd=tmp_path)
    assert settings.master_key is not None and settings.master_key.get() == "x" * 16
    assert load_settings(env={"PARLEY_MASTER_KEY": ""}, cwd=tmp_path).master_key is None


def test_bad_kind_and_base_url_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind must be one of"):
        _load(tmp_path, '[[providers]]\nname = "a"\nkind = "bard"\n')
    with pytest.raises(ConfigError, match="base_url must be an http"):
        _load(
            tmp_path, '[[providers]]\nname = "a"\nkind = "ollama"\nbase_url = "localhost:11434"\n'
        )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PARLEY_RETENTION_REQUEST_LOG_DAYS", "nan"),
        ("PARLEY_RETENTION_REQUEST_LOG_DAYS", "inf"),
        ("PARLEY_RETENTION_REQUEST_LOG_DAYS", "1e400"),
        ("PARLEY_RETENTION_REQUEST_LOG_DAYS", "1000000"),
        ("PARLEY_RETENTION_REQUEST_LOG_DAYS", "-1"),
        ("PARLEY_RETENTION_HTTP_METRICS_DAYS", "inf"),
        ("PARLEY_RETENTION_HTTP_METRICS_DAYS", "36501"),
    ],
)
def test_retention_ages_must_be_finite_and_at_most_a_century(
    tmp_path: Path, variable: str, value: str
) -> None:
    setting = "retention." + variable.removeprefix("PARLEY_RETENTION_").lower()
    with pytest.raises(ConfigError, match=setting):
        load_settings(env={variable: value}, cwd=tmp_path)


def test_retention_ages_up_to_a_century_are_read(tmp_path: Path) -> None:
    settings = _load(tmp_path, "[retention]\nrequest_log_days = 36500\nhttp_metrics_days = 0.5\n")
    assert settings.retention.request_log_days == 36500  # type: ignore[attr-defined]
    assert settings.retention.http_metrics_days == 0.5  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_intervals_must_be_finite_and_not_negative(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="interval_hours"):
        _load(tmp_path, f'[retention]\ninterval_hours = "{value}"\n')


PROVIDER = '[[providers]]\nname = "a"\nbase_url = "http://127.0.0.1:9/v1"\n'


@pytest.mark.parametrize(
    ("toml", "complaint"),
    [
        # Misspelt settings: a provider would go upstream without its key.
        (PROVIDER + 'api_kye = "sk-live-123"\n', "provider a: unknown setting(s) api_kye"),
        ("[server]\nprot = 9000\n", "[server]: unknown setting(s) prot"),
        ("[sever]\nport = 9000\n", "config: unknown setting(s) sever"),
        # Types that were coerced: port 1, a 1 s timeout, any string taken for true.
        ("[server]\nport = true\n", "port must be an integer"),
        ("[timeouts]\ntotal = true\n", "timeouts.total must be a number"),
        (PROVIDER + 'stream_usage = "sometimes"\n', "stream_usage must be true or false"),
        ('[search]\nreconcile_on_start = "maybe"\n', "reconcile_on_start must be true or false"),
        # Values that started a server failing every request, or listening elsewhere.
        ("[timeouts]\ntotal = -1\n", "timeouts.total must be a positive number"),
        ("[timeouts]\nconnect = 0\n", "timeouts.connect must be a positive number"),
        ('[[providers]]\nname = "a"\nbase_url = "http://"\n', "base_url must name a host"),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://127.0.0.1:99999/v1"\n',
            "base_url has an invalid port",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://u:secret-pw@host/v1"\n',
            "base_url must not hold a user or password",
        ),
        ("[server]\nport = 99999\n", "port must be from 0 to 65535"),
        ("[server]\nmax_body_bytes = -1\n", "max_body_bytes must be at least 1"),
        ('[server]\nlog_level = "verbose"\n', "log_level must be one of"),
        ('[server]\ndatabase_url = "not a url"\n', "DATABASE_URL is not a database URL"),
        (
            '[server]\ndatabase_url = "postgresql://app:pw@db:54x2/parley"\n',
            "DATABASE_URL is not a database URL",
        ),
        (
            '[server]\ndatabase_url = "postgresql://app:Sup3r@Secret@127.0.0.1/db"\n',
            "write an '@' in the password as %40",
        ),
    ],
)
def test_settings_that_would_misbehave_later_are_refused_at_load(
    tmp_path: Path, toml: str, complaint: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(complaint)) as caught:
        _load(tmp_path, toml)
    for secret in ("secret-pw", "Sup3r", "pw@db", "sk-live"):
        assert secret not in str(caught.value)


def test_booleans_as_written_and_a_non_utf8_file(tmp_path: Path) -> None:
    """``"false"`` and ``"no"`` were true (``bool`` of a non-empty string)."""
    settings = _load(tmp_path, PROVIDER + 'stream_usage = "false"\nlist_models = "no"\n')
    [provider] = settings.providers  # type: ignore[attr-defined]
    assert (provider.stream_usage, provider.list_models) == (False, False)
    settings = _load(tmp_path, PROVIDER + "stream_usage = false\nlist_models = true\n")
    [provider] = settings.providers  # type: ignore[attr-defined]
    assert (provider.stream_usage, provider.list_models) == (False, True)
    (tmp_path / "parley.toml").write_bytes(b'[[providers]]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(env={"PARLEY_CONFIG": str(tmp_path / "parley.toml")}, cwd=tmp_path)
