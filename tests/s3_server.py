"""A real S3-compatible server on loopback for tests (moto's, in a thread of the test process), and helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

#: dummy credentials: moto accepts any, botocore refuses to sign without some
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "reltag-test",
    "AWS_SECRET_ACCESS_KEY": "reltag-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """Start moto's S3 server on 127.0.0.1:<free port>; yield its endpoint URL; stop it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict:
    """Environment of a `reltag` subprocess that talks to the loopback server: the endpoint through fsspec's
    per-protocol setting (FSSPEC_S3_ENDPOINT_URL -> S3FileSystem(endpoint_url=...)), dummy credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    return {**env, **CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint}
