"""The argument parser every ``moeprobe`` command uses: one-line usage errors (exit status 2) that suggest the
nearest option on a typo, instead of argparse's usage block."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)$")


def nearest(word: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    """The candidate closest to ``word`` (difflib ratio at least 0.6), or None."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors become :class:`moeprobe.cli.main.UsageError` (exit status 2).

    ``--help`` still prints the full help and exits 0 through ``SystemExit``, which ``moeprobe.cli.main``
    passes on.
    """

    def error(self, message: str) -> NoReturn:
        from .main import UsageError

        raise UsageError(f"{message}{self._suggestion(message)} (see {self.prog} --help)")

    def _suggestion(self, message: str) -> str:
        match = _UNRECOGNIZED.search(message)
        if not match:
            return ""
        options = [opt for opt in self._option_string_actions if opt.startswith("--")]
        for word in match.group(1).split():
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                guess = nearest(flag, options)
                if guess:
                    return f"; did you mean {guess}?"
        return ""


def parse_tags(items: list[str]) -> dict[str, str]:
    """``--tag KEY=VALUE`` options (repeatable) as a dict; a malformed one is a usage error (exit 2)."""
    from .main import UsageError

    tags: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag domain=code")
        tags[key.strip()] = value.strip()
    return tags
