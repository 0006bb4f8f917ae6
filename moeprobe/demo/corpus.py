"""The training corpus, built at training time from what every Python installation ships.

Four clearly different domains, each split into train and held-out text by a stable hash of the source
(a file name, a topic name or a generator seed), so held-out prompts are never trained on:

- ``code``: Python source of the standard library;
- ``prose``: English documentation text (``pydoc_data.topics`` and module docstrings), with indented
  code examples removed so the domain stays prose;
- ``math``: arithmetic sentences generated from a seeded RNG;
- ``data``: JSON records and CSV rows generated from a seeded RNG.

No second natural language: the standard library ships no running text in another language that is
available on every platform (``encodings`` holds codec tables, not text).
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "math", "data")

# Caps keep the build fast (a few seconds) and the byte counts comparable across domains.
_MAX_CODE_BYTES = 6_000_000
_GENERATED_BYTES = 2_000_000
_HELD_OUT_MOD = 10  # one source in ten is held out


@dataclass(frozen=True)
class Split:
    train: bytes
    held_out: bytes


def _held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % _HELD_OUT_MOD == 0


def _ascii(text: str) -> str:
    # Non-ASCII bytes are rare in these sources; dropping them keeps every prompt window valid text.
    return text.encode("ascii", errors="ignore").decode("ascii")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    # encodings/ holds machine-generated codec tables that are near-identical across files: they would
    # leak held-out text into training (and teach little about code).
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_code() -> Split:
    root = Path(sysconfig.get_paths()["stdlib"])
    train: list[str] = []
    held: list[str] = []
    size = 0
    for path in _stdlib_files():
        try:
            text = _ascii(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        rel = path.relative_to(root).as_posix()
        (held if _held_out(rel) else train).append(text)
        size += len(text)
        if size >= _MAX_CODE_BYTES:
            break
    return Split("\n\n".join(train).encode(), "\n\n".join(held).encode())


def _prose_from(text: str) -> str:
    # Keep paragraphs of running text; drop indented blocks (code examples, grammar rules, tables).
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith((" ", "\t", ">>>"))]
    return _ascii("\n".join(lines))


def _module_docstrings() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[tuple[str, str]] = []
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(tree)]
        docs += [ast.get_docstring(n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        text = "\n".join(d for d in docs if d and len(d) > 200)
        if text:
            out.append((path.relative_to(root).as_posix(), text))
    return out


def build_prose() -> Split:
    from pydoc_data.topics import topics

    train: list[str] = []
    held: list[str] = []
    sources = [(f"topic:{k}", v) for k, v in sorted(topics.items())] + _module_docstrings()
    for key, text in sources:
        prose = _prose_from(text)
        if len(prose) > 100:
            (held if _held_out(key) else train).append(prose)
    return Split("\n\n".join(train).encode(), "\n\n".join(held).encode())


def _math_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    a, b = rng.randrange(1000), rng.randrange(1, 1000)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        return f"{a * b} / {b} = {a}"
    c = rng.randrange(10)
    return f"({a} + {b}) * {c} = {(a + b) * c}"


def generate_math(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    out: list[str] = []
    total = 0
    while total < size:
        line = _math_line(rng)
        out.append(line)
        total += len(line) + 1
    return ("\n".join(out) + "\n").encode()


_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
_CITIES = ["Berlin", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Seoul", "Tunis", "Porto", "Osaka"]
_STATUS = ["active", "pending", "closed", "failed"]


def _record(rng: random.Random, i: int) -> dict[str, object]:
    return {
        "id": i,
        "name": rng.choice(_NAMES),
        "city": rng.choice(_CITIES),
        "age": rng.randrange(18, 90),
        "score": round(rng.uniform(0, 100), 2),
        "status": rng.choice(_STATUS),
        "tags": rng.sample(["a", "b", "c", "x", "y", "z"], rng.randrange(0, 4)),
    }


def generate_data(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    out: list[str] = []
    total = 0
    i = 0
    while total < size:
        # Alternate between JSON lines and a CSV table so both formats are in the domain.
        if rng.random() < 0.5:
            block = "\n".join(json.dumps(_record(rng, i + j)) for j in range(rng.randrange(3, 10)))
        else:
            rows = [_record(rng, i + j) for j in range(rng.randrange(3, 10))]
            block = "id,name,city,age,score,status\n" + "\n".join(
                f"{r['id']},{r['name']},{r['city']},{r['age']},{r['score']},{r['status']}" for r in rows
            )
        i += 1000
        out.append(block)
        total += len(block) + 2
    return ("\n\n".join(out) + "\n").encode()


def build_corpus() -> dict[str, Split]:
    """All domains, deterministic for a given Python installation."""
    return {
        "code": build_code(),
        "prose": build_prose(),
        # Different seeds for train and held-out: generated text never repeats exactly across the split.
        "math": Split(generate_math(1, _GENERATED_BYTES), generate_math(2, _GENERATED_BYTES // 10)),
        "data": Split(generate_data(1, _GENERATED_BYTES), generate_data(2, _GENERATED_BYTES // 10)),
    }
