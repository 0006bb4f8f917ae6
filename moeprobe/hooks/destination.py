"""Where a probe writes: the trace directory, this process's rank in the job and its shard in the directory.

Single-process jobs own the whole trace directory (created, or replaced with ``force``); in a multi-rank job
every rank shares the directory and owns only its ``rank=N`` shard, so ranks never remove each other's data.
An object-store URL (``s3://bucket/prefix``) stays a string (``Path`` would collapse its double slash); the
same ownership rules hold there (docs/scale.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..traces.storage import is_remote


def job_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size): as given, else torch.distributed's when it is initialised, else the
    ``RANK``/``WORLD_SIZE`` environment of torchrun, else a single process."""
    found_rank, found_world = _dist_rank_world()
    return (found_rank if rank is None else rank), (found_world if world_size is None else world_size)


def _dist_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a broken torch.distributed install: fall back to the environment
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def trace_location(path: str | os.PathLike[str]) -> Path | str:
    """A trace location as the probe keeps it: a ``Path``, or an object-store URL kept as a string."""
    return path if is_remote(path) else Path(path)


@dataclass(frozen=True)
class TraceDestination:
    path: Path | str  # a str only for an object-store URL
    rank: int
    world_size: int

    @property
    def owned(self) -> Path:
        """What this process may create and remove: the whole trace, or its shard in a multi-rank job."""
        assert isinstance(self.path, Path)
        return self.path if self.world_size == 1 else self.path / f"rank={self.rank}"

    def prepare(self, *, force: bool) -> None:
        """Make the directory ready for this process's writer; refuses an existing trace without ``force``."""
        from ..traces.writer import prepare_trace_dir

        if self.world_size == 1:
            prepare_trace_dir(self.path, force=force)
            return
        if isinstance(self.path, str):  # no directory to make; the writer refuses an existing shard
            from ..traces.remote_writer import prepare_remote_shard

            prepare_remote_shard(self.path, self.rank, force=force)
            return
        from ..traces.removal import remove_shard
        from ..traces.writer import cannot_write

        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_write(self.path, exc) from exc
        shard = self.owned
        if (shard.exists() or shard.is_symlink()) and force:
            remove_shard(shard)  # only what moeprobe wrote, and not while its writer runs

    def abandon(self) -> None:
        """Remove what this process created a moment ago (a trace that holds no record yet)."""
        if isinstance(self.path, str):
            from ..traces.remote_writer import remove_remote

            remove_remote(self.path, None if self.world_size == 1 else self.rank)
            return
        shutil.rmtree(self.owned, ignore_errors=True)
