"""Flow runs on the temporary server: heartbeats off, with settings built once per process."""

from __future__ import annotations

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from flows.local import temporary_server_settings


def test_heartbeats_off_on_the_temporary_server_and_back_after():
    # no server configured, as `reltag run` on a fresh machine (the session's test harness may have set one)
    with temporary_settings(
        updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}, restore_defaults={PREFECT_API_URL}
    ):
        assert not PREFECT_API_URL.value()
        with temporary_server_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
            first = get_current_settings()
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 60
        with temporary_server_settings():
            assert get_current_settings() is first  # built once, not re-read from every source each run
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 90}):
            with temporary_server_settings():  # other settings: built anew, never a stale copy
                assert get_current_settings() is not first
                assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 90


def test_a_real_server_keeps_its_heartbeats():
    with temporary_settings(
        updates={PREFECT_API_URL: "http://127.0.0.1:4200/api", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}
    ):
        with temporary_server_settings():
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 30
