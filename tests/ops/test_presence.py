"""The server's presence lock and crash marker, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from parley.errors import ConfigError
from parley.ops.presence import ServerPresence, exclusive, previous_run_unclean, server_running
from parley.settings import Settings

MakeSettings = Callable[..., Settings]


def test_servers_share_the_database_and_shut_out_exclusive_commands(settings: Settings) -> None:
    assert not server_running(settings)
    with ServerPresence(settings), ServerPresence(settings):
        assert server_running(settings)
        with pytest.raises(ConfigError, match="stop it first"), exclusive(settings):
            pass
    assert not server_running(settings)


def test_a_server_cannot_start_during_an_exclusive_command(settings: Settings) -> None:
    with exclusive(settings), pytest.raises(ConfigError, match="restored or maintained"):
        ServerPresence(settings).__enter__()
    with ServerPresence(settings):
        pass


def test_a_crashed_run_is_seen_by_the_next_start_and_a_clean_one_is_not(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    settings = make_settings(tmp_path)  # the crash marker guards SQLite's write-ahead log
    crashed = ServerPresence(settings)
    crashed.__enter__()
    crashed.__exit__(None, None, None)  # left without mark_clean: a crash
    assert previous_run_unclean(settings)
    with ServerPresence(settings) as presence:
        assert presence.previous_run_unclean
        presence.mark_clean()
    assert not previous_run_unclean(settings)
    with ServerPresence(settings) as presence:
        assert not presence.previous_run_unclean
        presence.mark_clean()


def test_the_marker_stays_while_another_server_still_runs(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    settings = make_settings(tmp_path)
    with ServerPresence(settings):
        with ServerPresence(settings) as second:
            second.mark_clean()
        # The first server is still up: the log may hold its commits.
        with ServerPresence(settings) as third:
            assert not third.previous_run_unclean  # another holder: not a crash
            third.mark_clean()


def test_a_second_server_keeps_the_database_after_the_first_stops(
    tmp_path: Path, make_settings: MakeSettings
) -> None:
    # A restore or an offline VACUUM under the second server would swap the file it
    # still writes to: its commits would go to a deleted file.
    settings = make_settings(tmp_path)
    first = ServerPresence(settings)
    first.__enter__()
    with ServerPresence(settings) as second:
        first.mark_clean()
        first.__exit__(None, None, None)
        assert server_running(settings)
        with pytest.raises(ConfigError, match="stop it first"), exclusive(settings):
            pass
        second.mark_clean()
    assert not server_running(settings)
