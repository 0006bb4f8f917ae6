"""An S3-compatible server for tests: moto in server mode on 127.0.0.1 (a random port), with a bucket.

The credentials are fakes the server accepts; the secret is distinctive so that a test can assert it never lands
in a manifest, an object, a report or a log line. They reach moeprobe only through botocore's standard chain
(environment variables), as in production.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

SECRET = "moeprobe-test-secret-7f3a9c"
ACCESS_KEY = "AKIAMOEPROBETEST0001"
BUCKET = "traces"


@dataclass(frozen=True)
class ObjectStoreServer:
    endpoint: str
    bucket: str

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def env(self) -> dict[str, str]:
        """The variables a process needs to reach the store (what a user exports on a cluster)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        import boto3

        client = boto3.client("s3")
        found: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return found


@pytest.fixture(scope="session")
def _moto_server() -> Iterator[str]:
    pytest.importorskip("moto.server", reason="moto[server] (dev extra) is needed for the object-store tests")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(_moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStoreServer]:
    """A fresh bucket on the session's server, and the environment pointing at it (for this process and the
    subprocesses it starts)."""
    import uuid

    store = ObjectStoreServer(_moto_server, f"{BUCKET}-{uuid.uuid4().hex[:12]}")
    for key, value in store.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    import boto3

    boto3.client("s3").create_bucket(Bucket=store.bucket)
    yield store
