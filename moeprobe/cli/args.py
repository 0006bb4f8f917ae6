"""The argument parser every ``moeprobe`` command uses: one-line usage errors (exit status 2) that suggest the
nearest option on a typo, instead of argparse's usage block."""

from __future__ import annotations

import argparse
import difflib
import re
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from ..analysis.filters import Filters

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


def add_selection_options(group: argparse._ActionsContainer) -> None:
    """``--steps`` and ``--layer``/``--layers``, spelled and parsed the same by report and simulate."""
    group.add_argument("--steps", metavar="A:B", help="steps A (included) to B (excluded); A: or :B for open ends")
    group.add_argument("--layer", "--layers", dest="layer", action="append", default=[], metavar="N[,N...]",
                       help="MoE layer index (repeatable, or comma-separated)")


def selection_filters(args: argparse.Namespace) -> Filters:
    """The ``Filters`` of the parsed selection options (``add_selection_options``, and report's ``--phase``,
    ``--tag`` and ``--rank`` where the command has them). A malformed value is a usage error (exit 2); one the
    trace lacks is found later and is bad input (1)."""
    from ..analysis.filters import FilterError, Filters, parse_indices, parse_steps, parse_tag
    from .main import UsageError

    try:
        return Filters(
            steps=parse_steps(args.steps) if args.steps else None,
            phase=getattr(args, "phase", None),
            tags=tuple(parse_tag(t) for t in getattr(args, "tag", [])),
            layers=parse_indices(args.layer, "--layers"),
            ranks=parse_indices(getattr(args, "rank", []), "--rank"),
        )
    except FilterError as exc:
        raise UsageError(str(exc)) from None
