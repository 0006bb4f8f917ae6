"""Fixtures shared by the integration tests."""

from tests.object_store import _moto_server, s3  # noqa: F401 (fixtures: an S3-compatible server on 127.0.0.1)
