"""Where a trace lives when it is not a local directory: an S3-compatible object store, through fsspec/s3fs.

This is the one seam between the trace format and object storage. Writer and reader keep their local-disk code
(rename for atomicity, ``flock`` for one writer per shard, symlink and FIFO refusals), and call this module for
``s3://`` locations instead:

* ``put_atomic``: an object PUT is atomic, a reader sees the whole object or none, so no temporary name and no
  rename are needed; a segment is PUT whole, and the shard manifest after it.
* ``listing``: one recursive LIST of the prefix (paginated by s3fs), the names and sizes the reader needs.
* ``read_bytes``: a bounded GET (a manifest is refused past a size limit before a byte is read).
* ``delete``: for ``force``, object by object, only names moeprobe writes.

Credentials and endpoint come from botocore's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws/config``, instance roles; ``AWS_ENDPOINT_URL`` for S3-compatible stores). moeprobe
never reads them itself, so nothing it writes (manifests, logs, reports) can contain them: only the ``s3://`` URL.

There is no ``flock`` on S3. What replaces it: one writer per ``rank=R/`` prefix by construction (ranks of one
job are unique), and a writer refuses to start on a prefix that already holds a shard. Two writers started on
the same rank at the same instant are not detected; see docs/scale.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeGuard

from .errors import TraceError

SCHEMES = ("s3", "s3a")


class StorageUnavailableError(TraceError):
    """An object-store URL was given but its client library is not installed, or the scheme is unknown."""


def is_remote(path: str | os.PathLike[str]) -> TypeGuard[str]:
    """True for an object-store URL (``s3://bucket/prefix``). A ``Path`` is always local: ``Path("s3://b")``
    has already collapsed the double slash, so only strings can name a store."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def location(path: str | os.PathLike[str]) -> Any:
    """A trace location as the readers and writers take it: a ``Path``, or an object-store URL kept as a string."""
    from pathlib import Path

    return path if is_remote(path) else Path(path)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


@dataclass(frozen=True)
class StoredObject:
    url: str  # s3://bucket/prefix/rank=0/routing/000000.parquet
    relative: str  # rank=0/routing/000000.parquet
    size: int
    version: str = ""  # the store's ETag (changes with every PUT): lets a reader skip re-fetching what it has


class ObjectStore:
    """An fsspec filesystem rooted at one trace URL. Every failure of the store surfaces as ``OSError`` (what the
    writer counts as a write error and the reader turns into a one-line refusal)."""

    def __init__(self, url: str) -> None:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise StorageUnavailableError(
                f"{url}: unsupported location; a trace is a local directory or an s3:// URL (s3://bucket/prefix)"
            )
        root = rest.strip("/")
        if not root or root.startswith("/"):
            raise StorageUnavailableError(f"{url}: an s3:// URL needs a bucket and a prefix (s3://bucket/prefix)")
        self.url = f"s3://{root}"
        self.root = root  # bucket/prefix, the form fsspec methods take
        try:
            import fsspec

            # skip_instance_cache: a fresh client per store, so that a process that forks (torch.multiprocessing)
            # never shares an event loop or connection pool with its parent.
            self.fs: Any = fsspec.filesystem("s3", skip_instance_cache=True)
        except ImportError as exc:
            raise StorageUnavailableError(
                f"{url}: s3:// traces need s3fs, which is not installed: pip install 'moeprobe[s3]'"
            ) from exc

    def key(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def url_of(self, relative: str) -> str:
        return f"s3://{self.key(relative)}"

    def put_atomic(self, relative: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self._call(self.fs.pipe_file, self.key(relative), data)

    def read_bytes(self, relative: str, limit: int) -> bytes:
        """The object's bytes, refusing (``ValueError``) an object larger than ``limit`` before reading it."""
        info = self._call(self.fs.info, self.key(relative))
        size = int(info.get("size") or 0)
        if size > limit:
            raise ValueError(f"{size:,} bytes")
        return bytes(self._call(self.fs.cat_file, self.key(relative)))

    def listing(self, relative: str = "") -> list[StoredObject]:
        """Every object under ``relative`` (recursively), fresh from the store (no cached listing)."""
        self.fs.invalidate_cache()
        prefix = self.key(relative)
        try:
            found = self._call(self.fs.find, prefix, detail=True)
        except FileNotFoundError:
            return []
        objects = []
        for key, info in sorted(found.items()):
            if info.get("type") == "directory" or not key.startswith(self.root + "/"):
                continue
            version = str(info.get("ETag") or info.get("LastModified") or "")
            objects.append(StoredObject(f"s3://{key}", key[len(self.root) + 1:], int(info.get("size") or 0), version))
        return objects

    def exists(self, relative: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self._call(self.fs.exists, self.key(relative)))

    def delete(self, relatives: list[str]) -> None:
        if relatives:
            self._call(self.fs.rm, [self.key(r) for r in relatives])

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # botocore: no credentials, endpoint unreachable, ...; one kind for the callers
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"{type(exc).__name__}: {first}") from exc


def open_store(url: str) -> ObjectStore:
    return ObjectStore(url)


def error_text(exc: BaseException) -> str:
    """One line for a store error."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
