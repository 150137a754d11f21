"""The vault: provider keys encrypted at rest under a master secret from the environment or
a key file made with mode 0600 on first run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from parley.errors import ConfigError
from parley.security.vault import Vault, VaultError
from parley.settings import Settings, load_settings

CANARY = "sk-canary-VAULT-0123456789abcdef"


def settings_in(tmp_path: Path, **env: str) -> Settings:
    base = {"PARLEY_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": "sqlite://"}
    return load_settings(env={**base, **env}, cwd=tmp_path)


def test_key_file_is_created_0600_in_a_0700_directory_and_reused(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    path = settings.secret_key_file
    assert not path.parent.exists()

    first = Vault.from_settings(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    ciphertext = first.encrypt(CANARY)

    # A restart reads the same file: what was encrypted before still decrypts.
    again = Vault.from_settings(settings)
    assert again.key_id == first.key_id
    assert again.decrypt(ciphertext) == CANARY
    assert path.read_text().strip() != ""


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    Vault.from_settings(settings)
    os.chmod(settings.secret_key_file, 0o644)
    with pytest.raises(ConfigError, match=r"may be read by other users.*chmod 600"):
        Vault.from_settings(settings)


def test_malformed_key_file_is_refused(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    path = settings.secret_key_file
    path.parent.mkdir(mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key\n")
    os.close(fd)
    with pytest.raises(ConfigError, match="malformed"):
        Vault.from_settings(settings)


def test_secret_key_from_the_environment_needs_no_file(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, PARLEY_SECRET_KEY="correct horse battery staple")
    vault = Vault.from_settings(settings)
    assert not settings.secret_key_file.exists()
    ciphertext = vault.encrypt(CANARY)
    # Another process with the same secret reads it.
    other = Vault.from_settings(
        settings_in(tmp_path / "other", PARLEY_SECRET_KEY="correct horse battery staple")
    )
    assert other.decrypt(ciphertext) == CANARY


def test_ciphertext_hides_the_plaintext_and_differs_each_time() -> None:
    vault = Vault("a master secret")
    one, two = vault.encrypt(CANARY), vault.encrypt(CANARY)
    assert one != two
    for ciphertext in (one, two):
        assert CANARY not in ciphertext
        assert ciphertext.isascii()
        assert vault.decrypt(ciphertext) == CANARY
    assert CANARY not in repr(vault)


def test_wrong_master_secret_is_named_as_the_cause() -> None:
    ciphertext = Vault("the old secret").encrypt(CANARY)
    with pytest.raises(VaultError) as caught:
        Vault("a new secret", "PARLEY_SECRET_KEY").decrypt(ciphertext)
    message = caught.value.message
    assert "another master secret" in message and "PARLEY_SECRET_KEY" in message
    assert CANARY not in message and CANARY not in str(caught.value)


def test_damaged_ciphertext_is_an_error_not_garbage() -> None:
    vault = Vault("a master secret")
    ciphertext = vault.encrypt(CANARY)
    damaged = ciphertext[:-6] + ("A" if ciphertext[-6] != "A" else "B") + ciphertext[-5:]
    with pytest.raises(VaultError, match="damaged"):
        vault.decrypt(damaged)
    with pytest.raises(VaultError, match="format"):
        vault.decrypt(CANARY)
