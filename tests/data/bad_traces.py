"""A corpus of broken traces, generated into a temporary directory from the committed good one.

Each case is a path that every trace-taking command must refuse with one line and exit status 1. ``expect`` is a
fragment of the one-line message, so that a case fails with the *right* error, not just any error.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

GOOD = Path(__file__).parent / "v1-good"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    expect: str
    # The TUI waits for a path that does not exist yet or an empty directory (a job is about to write it):
    # those cases are errors for every other command, and "waiting" states for `moeprobe tui`.
    tui_waits: bool = False
    # Damage inside column data (the footer intact) shows only when rows are read; `inspect` reads footers only
    # (it must stay instant on a 100 MB trace), so it shows such a trace and the data commands refuse it.
    data_only: bool = False


def _copy(root: Path, name: str) -> Path:
    path = root / name
    shutil.copytree(GOOD, path)
    return path


def _segment(trace: Path) -> Path:
    return sorted((trace / "rank=0" / "routing").glob("*.parquet"))[0]


def _json_edit(file: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def _manifest(**changes: Any) -> Callable[[Path], None]:
    def damage(trace: Path) -> None:
        _json_edit(trace / "manifest.json", lambda d: d.update(changes))

    return damage


def _drop(key: str, where: str = "manifest.json") -> Callable[[Path], None]:
    return lambda trace: _json_edit(trace / where, lambda d: d.pop(key))


def _layer(**changes: Any) -> Callable[[Path], None]:
    return lambda trace: _json_edit(trace / "manifest.json", lambda d: d["layers"][0].update(changes))


def _shard(**changes: Any) -> Callable[[Path], None]:
    return lambda trace: _json_edit(trace / "rank=0" / "shard.json", lambda d: d.update(changes))


def _write(relative: str, content: bytes) -> Callable[[Path], None]:
    return lambda trace: (trace / relative).write_bytes(content)


def _segment_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(trace: Path) -> None:
        segment = _segment(trace)
        segment.write_bytes(edit(segment.read_bytes()))

    return damage


def _segment_table(table: pa.Table) -> Callable[[Path], None]:
    return lambda trace: pq.write_table(table, _segment(trace))


def _flip_data_page(data: bytes) -> bytes:
    # Keep the footer (so the schema check passes) and scramble the column data before it: the damage is
    # only found when the rows are read, the hardest place to turn into a clean error.
    body = bytearray(data)
    footer = int.from_bytes(data[-8:-4], "little") + 8
    for i in range(4, len(body) - footer):
        body[i] ^= 0x5A
    return bytes(body)


def _wrong_column_type(trace: Path) -> None:
    good = pq.read_table(_segment(trace))
    index = good.schema.get_field_index("expert")
    pq.write_table(good.set_column(index, "expert", good.column("expert").cast(pa.string())), _segment(trace))


def _manifest_is_directory(trace: Path) -> None:
    (trace / "manifest.json").unlink()
    (trace / "manifest.json").mkdir()


def _segment_is_directory(trace: Path) -> None:
    segment = _segment(trace)
    segment.unlink()
    segment.mkdir()


def _raw_manifest(edit: Callable[[str], str]) -> Callable[[Path], None]:
    """Edit manifest.json as text: for values json.dumps cannot write (a 4,301-digit integer)."""

    def damage(trace: Path) -> None:
        manifest = trace / "manifest.json"
        manifest.write_text(edit(manifest.read_text()))

    return damage


def _huge_integer(text: str) -> str:
    data = json.loads(text)
    data["world_size"] = 7
    return json.dumps(data).replace('"world_size": 7', '"world_size": ' + "7" * 4301)


def _deeply_nested(text: str) -> str:
    data = json.loads(text)
    data["options"] = "@@"
    return json.dumps(data).replace('"@@"', "[" * 2000 + "]" * 2000)


def _fifo(relative: str) -> Callable[[Path], None]:
    def damage(trace: Path) -> None:
        target = trace / relative if relative != "segment" else _segment(trace)
        target.unlink()
        os.mkfifo(target)

    return damage


def _symlink(relative: str, to: str) -> Callable[[Path], None]:
    def damage(trace: Path) -> None:
        target = trace / relative if relative != "segment" else _segment(trace)
        if to == "outside":
            # A perfectly good segment, but outside the trace: still not this trace's data.
            outside = trace.parent / f"{trace.name}-outside.parquet"
            shutil.copy(target, outside)
            destination = outside
        else:
            destination = Path(to)
        target.unlink()
        target.symlink_to(destination)

    return damage


def _sparse(relative: str, size: int) -> Callable[[Path], None]:
    def damage(trace: Path) -> None:
        with open(trace / relative, "r+b") as handle:
            handle.truncate(size)  # sparse: costs no disk, and would cost `size` bytes of memory to read

    return damage


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _claim_rows(claimed: int) -> Callable[[bytes], bytes]:
    """Edit the Parquet footer (Thrift compact protocol) so that the file claims ``claimed`` rows: FileMetaData's
    num_rows (field 3, i64: header byte 0x16, zigzag varint). Row groups and data pages are left as they are."""

    def edit(data: bytes) -> bytes:
        length = int.from_bytes(data[-8:-4], "little")
        footer = data[-8 - length : -8]
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        old, new = _varint(rows << 1), _varint(claimed << 1)
        # num_rows follows the schema list and precedes the row_groups list (0x19).
        assert footer.count(b"\x16" + old + b"\x19") == 1
        footer = footer.replace(b"\x16" + old + b"\x19", b"\x16" + new + b"\x19")
        return data[: -8 - length] + footer + len(footer).to_bytes(4, "little") + b"PAR1"

    return edit


# name -> (damage applied to a copy of the good trace, fragment of the expected message)
DAMAGED: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest-missing": (lambda t: (t / "manifest.json").unlink(), "without manifest.json"),
    "manifest-empty-file": (_write("manifest.json", b""), "not valid JSON"),
    "manifest-not-json": (_write("manifest.json", b"{not json"), "not valid JSON"),
    "manifest-json-array": (_write("manifest.json", b"[1, 2, 3]"), "expected a JSON object"),
    "manifest-not-utf8": (_write("manifest.json", b"\xff\xfe\x00binary"), "not UTF-8"),
    "manifest-is-directory": (_manifest_is_directory, "manifest.json"),
    "wrong-magic": (_manifest(magic="memray"), "magic is 'memray'"),
    "magic-missing": (_drop("magic"), "magic is None"),
    "future-version": (_manifest(format_version=99), "version 99 is not supported"),
    "version-zero": (_manifest(format_version=0), "version 0 is not supported"),
    "version-string": (_manifest(format_version="1"), "'format_version' should be int"),
    "version-bool": (_manifest(format_version=True), "'format_version' should be int"),
    "layers-string": (_manifest(layers="many"), "'layers' should be list"),
    "layers-element-number": (_manifest(layers=[3]), "layers[0] should be an object"),
    "layer-missing-experts": (lambda t: _json_edit(t / "manifest.json", lambda d: d["layers"][0].pop("num_experts")),
                              "missing field layers[0].'num_experts'"),
    "layer-experts-string": (_layer(num_experts="8"), "layers[0].'num_experts' should be int"),
    "layer-experts-zero": (_layer(num_experts=0), "'num_experts' should be 1 to 32767, found 0"),
    "layer-experts-negative": (_layer(num_experts=-3), "'num_experts' should be 1 to 32767, found -3"),
    "layer-experts-huge": (_layer(num_experts=2**40), "'num_experts' should be 1 to 32767"),
    "layer-top-k-over-experts": (_layer(top_k=99), "'top_k' should be 1 to num_experts"),
    "model-list": (_manifest(model=[]), "'model' should be dict"),
    "world-size-zero": (_manifest(world_size=0), "'world_size' should be at least 1"),
    "shard-pid-negative": (_shard(pid=-1), "'pid' should be a process id"),
    "shard-pid-huge": (_shard(pid=2**40), "'pid' should be a process id"),
    "shard-started-nan": (_shard(started_at=float("nan")), "'started_at' should be a time"),
    "shard-heartbeat-overflow": (_shard(heartbeat_at=1e300), "'heartbeat_at' should be a time"),
    "options-null": (_manifest(options=None), "'options' should be dict"),
    "world-size-float": (_manifest(world_size=1.5), "'world_size' should be int"),
    "shard-not-json": (_write("rank=0/shard.json", b"\x00\x01"), "shard.json"),
    "shard-bad-status": (_shard(status="exploded"), "status 'exploded'"),
    "shard-pid-string": (_shard(pid="6341"), "'pid' should be int"),
    "shard-counters-list": (_shard(counters=[]), "'counters' should be dict"),
    "shard-heartbeat-string": (_shard(heartbeat_at="yesterday"), "'heartbeat_at' should be float"),
    "shard-missing-status": (_drop("status", "rank=0/shard.json"), "missing field 'status'"),
    # Found by the property test: a breakdown counter that is a number crashed inspect's renderer.
    "shard-dropped-number": (lambda t: _json_edit(t / "rank=0" / "shard.json", lambda d: d["counters"].update(dropped=1)),
                             "counter 'dropped' should be an object of numbers"),
    "shard-decisions-string": (lambda t: _json_edit(t / "rank=0" / "shard.json",
                                                    lambda d: d["counters"].update(decisions="many")),
                               "counter 'decisions' should be a number"),
    "segment-truncated": (_segment_bytes(lambda b: b[: len(b) // 2]), "corrupt or truncated"),
    "segment-empty": (_segment_bytes(lambda b: b""), "corrupt or truncated"),
    "segment-wrong-magic": (_segment_bytes(lambda b: b"PAR2" + b[4:-4] + b"PAR2"), "corrupt or truncated"),
    "segment-garbage": (_segment_bytes(lambda b: b"PAR1garbage"), "corrupt or truncated"),
    # Found by the property test: one flipped byte in the footer's column names made pyarrow raise
    # UnicodeDecodeError, which escaped the reader.
    "segment-name-not-utf8": (_segment_bytes(lambda b: b[:1047] + bytes([b[1047] ^ 0xFF]) + b[1048:]),
                              "corrupt or truncated"),
    "segment-scrambled-data": (_segment_bytes(_flip_data_page), "corrupt"),
    "segment-wrong-schema": (_segment_table(pa.table({"x": [1, 2]})), "does not have the routing schema"),
    "segment-wrong-column-type": (_wrong_column_type, "does not have the routing schema"),
    "segment-is-directory": (_segment_is_directory, "corrupt or truncated"),
    # Issue 11: hostile numbers and special files. Each must be refused in one line, without hanging or
    # allocating what the file claims.
    "manifest-integer-4301-digits": (_raw_manifest(_huge_integer), "not a usable manifest"),
    "manifest-nested-2000-deep": (_raw_manifest(_deeply_nested), "nested too deeply"),
    "manifest-is-fifo": (_fifo("manifest.json"), "not a regular file (a FIFO)"),
    "manifest-to-dev-zero": (_symlink("manifest.json", "/dev/zero"), "not a regular file (a character device)"),
    "manifest-sparse-1gb": (_sparse("manifest.json", 1 << 30), "larger than a manifest can be"),
    "shard-is-fifo": (_fifo("rank=0/shard.json"), "not a regular file (a FIFO)"),
    "segment-is-fifo": (_fifo("segment"), "segment is a FIFO, not a regular file"),
    "segment-symlink-outside": (_symlink("segment", "outside"), "segment resolves outside the trace"),
    "segment-to-dev-zero": (_symlink("segment", "/dev/zero"), "segment resolves outside the trace"),
    "footer-claims-1e8-rows": (_segment_bytes(_claim_rows(10**8)), "it claims 100,000,000 rows"),
}


def _routing_value(column: str, value: Any, rows: int = 1) -> Callable[[Path], None]:
    """Set ``column`` of the first ``rows`` rows of the first routing segment to ``value`` (None: NULL, written
    under a nullable copy of the schema, which is what a foreign writer would produce)."""

    def damage(trace: Path) -> None:
        table = pq.read_table(_segment(trace))
        schema = pa.schema([f.with_nullable(True) for f in table.schema])
        table = table.cast(schema)
        index = schema.get_field_index(column)
        values = table.column(column).to_pylist()
        values[:rows] = [value] * rows
        pq.write_table(table.set_column(index, schema.field(index), pa.array(values, schema.field(index).type)), _segment(trace))

    return damage


# Rows whose values break the routing table's contract. The files are sound, so a command either answers with
# the rows left out and counted (report: "invalid: N routing rows") or refuses in one line (simulate, which
# replays every decision). name -> (damage, rows made invalid, fragment of simulate's refusal)
INVALID_ROWS: dict[str, tuple[Callable[[Path], None], int, str]] = {
    "expert-minus-one": (_routing_value("expert", -1), 1, "name expert -1"),
    "expert-min-int16": (_routing_value("expert", -32768), 1, "name expert -32768"),
    "expert-300-of-8": (_routing_value("expert", 300), 1, "name expert 300"),
    "expert-null": (_routing_value("expert", None), 1, "NULL"),
    "step-null": (_routing_value("step", None), 1, "NULL"),
    "position-null": (_routing_value("position", None), 1, "NULL"),  # weight may be NULL (engine imports)
    "step-min-int32": (_routing_value("step", -(2**31), rows=2), 2, "negative step"),
    "layer-unknown": (_routing_value("layer", 5, rows=2), 2, "layer 5, which the manifest does not list"),
}


@dataclass(frozen=True)
class InvalidRowsCase:
    name: str
    path: Path
    invalid: int
    simulate_expect: str


def make_invalid_rows(root: Path) -> list[InvalidRowsCase]:
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (damage, invalid, expect) in INVALID_ROWS.items():
        trace = _copy(root, name)
        damage(trace)
        cases.append(InvalidRowsCase(name, trace, invalid, expect))
    return cases


def make_corpus(root: Path) -> list[Case]:
    """Write every broken input under ``root`` and return the cases (those that need a non-root user are left
    out when running as root, which reads everything)."""
    root.mkdir(parents=True, exist_ok=True)
    cases = [
        Case("missing-path", root / "does-not-exist", "no such trace", tui_waits=True),
        Case("empty-directory", _mkdir(root / "empty"), "empty directory", tui_waits=True),
    ]
    file = root / "plain-file"
    file.write_text("hello\n")
    cases.append(Case("file-instead-of-directory", file, "it is a file"))
    cases.append(Case("parquet-file-instead-of-directory", _segment(_copy(root, "source")), "it is a file"))
    foreign = _mkdir(root / "foreign")
    (foreign / "data.csv").write_text("a,b\n1,2\n")
    cases.append(Case("foreign-directory", foreign, "without manifest.json"))
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    cases.append(Case("symlink-loop", root / "loop-a", "cannot be opened"))
    (root / "dangling").symlink_to(root / "nowhere")
    cases.append(Case("broken-symlink", root / "dangling", "broken symbolic link", tui_waits=True))
    for name, (damage, expect) in DAMAGED.items():
        trace = _copy(root, name)
        damage(trace)
        cases.append(Case(name, trace, expect, data_only=name == "segment-scrambled-data"))
    if os.geteuid() != 0:
        locked = _copy(root, "permission-denied")
        os.chmod(locked, 0)
        cases.append(Case("permission-denied", locked, "permission denied"))
        unreadable = _copy(root, "manifest-unreadable")
        os.chmod(unreadable / "manifest.json", 0)
        cases.append(Case("manifest-unreadable", unreadable, "permission denied"))
    return cases


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def restore_permissions(root: Path) -> None:
    """Let pytest's tmp_path cleanup remove what the permission cases locked."""
    for path in (root / "permission-denied", root / "manifest-unreadable" / "manifest.json"):
        if path.exists():
            os.chmod(path, 0o755)
