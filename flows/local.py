"""Running a flow in this process, on the temporary Prefect server that `reltag run` starts when no
Prefect API is configured."""

from __future__ import annotations

import contextlib
import threading

_lock = threading.Lock()
#: id(settings) -> (those settings, the same without heartbeats); a process has one or two settings objects.
#: Holding the settings keeps their id from being reused while the entry exists.
_no_heartbeats: dict[int, tuple[object, object]] = {}


@contextlib.contextmanager
def temporary_server_settings():
    """Prefect's settings for a flow run on the temporary server: flow-run heartbeats off.

    Heartbeats let a real server mark a crashed flow run; the temporary server dies with this process, so they
    serve nothing there and cost about a second per flow run (Prefect joins its heartbeat thread, which sleeps
    in 1 s steps). With PREFECT_API_URL set, the settings are left as they are.

    The changed settings are built once per process and reused: building them
    (`prefect.settings.temporary_settings`) re-reads every settings source, 0.05-0.2 s per flow run.
    """
    import prefect.context
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    if PREFECT_API_URL.value():
        yield
        return
    ctx = prefect.context.get_settings_context()
    with _lock:
        cached = _no_heartbeats.get(id(ctx.settings))
        if cached is None:
            if len(_no_heartbeats) >= 8:  # settings replaced many times (tests): keep memory bounded
                _no_heartbeats.clear()
            off = ctx.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            cached = _no_heartbeats[id(ctx.settings)] = (ctx.settings, off)
    with prefect.context.SettingsContext(profile=ctx.profile, settings=cached[1]):
        yield
