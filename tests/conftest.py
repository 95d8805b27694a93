"""Test session setup: offline hub, private Prefect home, markers that skip with the reason."""

from __future__ import annotations

import os
import shutil
import tempfile

# Set before anything imports prefect or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="reltag-prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    reasons = {
        "gpu": None if torch.cuda.is_available() else "no CUDA device on this machine",
        "nvcc": None if shutil.which("nvcc") else "nvcc is not on PATH",
        "compiler": None if (shutil.which("c++") or shutil.which("g++")) else "no C++ compiler on PATH",
    }
    for item in items:
        for name, why in reasons.items():
            if why and name in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"[{name}] {why}"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database, ephemeral server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
