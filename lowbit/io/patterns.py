"""Regular expressions read from files, matched in bounded time.

A pattern in a checkpoint (GPTQModel's `dynamic` table) is data, and Python's `re`
backtracks: `(.*)*x$` takes exponential time on a module name without an `x`. So such
patterns are parsed with Python's own regex parser, limited to a subset (literals,
classes, `.`, groups, alternation, `^`/`$`, quantifiers nested at most twice; no
backreferences, lookarounds, conditionals, atomic groups, possessive quantifiers or
flags), and matched by following the set of reachable positions through the parse
tree instead of backtracking: polynomial time in the length of the name, and the same
answer as `re.match` for every pattern of the subset.
"""

from __future__ import annotations

import re

try:  # Python 3.11+
    from re import _constants as sre
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_constants as sre
    import sre_parse

from lowbit.errors import UsageError

MAX_PATTERN_LENGTH = 1000
MAX_COUNT = 1000  # the largest {m,n} a pattern may give (module names are far shorter)
MAX_REPEAT_NESTING = 2
MAX_GROUP_NESTING = 32

_CATEGORIES = {
    sre.CATEGORY_DIGIT: re.compile(r"\d").fullmatch,
    sre.CATEGORY_NOT_DIGIT: re.compile(r"\D").fullmatch,
    sre.CATEGORY_SPACE: re.compile(r"\s").fullmatch,
    sre.CATEGORY_NOT_SPACE: re.compile(r"\S").fullmatch,
    sre.CATEGORY_WORD: re.compile(r"\w").fullmatch,
    sre.CATEGORY_NOT_WORD: re.compile(r"\W").fullmatch,
}
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT)
_BEGIN = (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING)
_END = (sre.AT_END, sre.AT_END_STRING)
_REFUSED = {
    "GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditional groups", "ASSERT": "lookarounds",
    "ASSERT_NOT": "lookarounds", "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive quantifiers",
}


class SafePattern:
    """A regular expression of the subset above; `match(text)` answers as `re.match` would."""

    def __init__(self, pattern: str):
        if not isinstance(pattern, str):
            raise UsageError(f"lowbit: a pattern must be a string, got {pattern!r}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise UsageError(f"lowbit: pattern {pattern[:40]!r}... is longer than {MAX_PATTERN_LENGTH} characters")
        self.pattern = pattern
        try:
            self._tree = sre_parse.parse(pattern)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise UsageError(f"lowbit: {pattern!r} is not a valid regular expression: {exc}") from exc
        if self._tree.state.flags & ~sre.SRE_FLAG_UNICODE:
            self._refuse("flags")
        self._check(self._tree, repeats=0, groups=0)

    def _refuse(self, what: str):
        raise UsageError(
            f"lowbit: pattern {self.pattern!r} uses {what}, which patterns read from files may not "
            "(they are matched in bounded time: literals, classes, groups, alternation, ^, $ and "
            f"quantifiers nested at most {MAX_REPEAT_NESTING} deep)"
        )

    def _check(self, items, repeats: int, groups: int) -> None:
        if groups > MAX_GROUP_NESTING:
            self._refuse("groups nested too deeply")
        for op, av in items:
            if str(op) in _REFUSED:
                self._refuse(_REFUSED[str(op)])
            if op in _REPEATS:
                low, high, body = av
                if repeats + 1 > MAX_REPEAT_NESTING:
                    self._refuse("quantifiers nested too deeply")
                if low > MAX_COUNT or (high != sre.MAXREPEAT and high > MAX_COUNT):
                    self._refuse(f"counts above {MAX_COUNT}")
                self._check(body, repeats + 1, groups + 1)
            elif op is sre.SUBPATTERN:
                _, add_flags, del_flags, body = av
                if add_flags or del_flags:
                    self._refuse("flags")
                self._check(body, repeats, groups + 1)
            elif op is sre.BRANCH:
                for body in av[1]:
                    self._check(body, repeats, groups + 1)
            elif op is sre.AT and av not in (*_BEGIN, *_END):
                self._refuse("word boundaries")
            elif op not in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN, sre.AT):
                self._refuse(str(op).lower())

    def match(self, text: str) -> bool:
        """Whether the pattern matches a prefix of `text` (`re.match`)."""
        return bool(_ends(self._tree, text, {0}))


def _ends(items, text: str, starts: set[int]) -> set[int]:
    """The positions where `items` can end, started at any of `starts`."""
    positions = starts
    for op, av in items:
        if not positions:
            break
        positions = _step(op, av, text, positions)
    return positions


def _step(op, av, text: str, positions: set[int]) -> set[int]:
    n = len(text)
    if op is sre.LITERAL:
        return {p + 1 for p in positions if p < n and ord(text[p]) == av}
    if op is sre.NOT_LITERAL:
        return {p + 1 for p in positions if p < n and ord(text[p]) != av}
    if op is sre.ANY:
        return {p + 1 for p in positions if p < n and text[p] != "\n"}
    if op is sre.IN:
        return {p + 1 for p in positions if p < n and _in_class(av, text[p])}
    if op is sre.AT:
        if av in _BEGIN:
            return {p for p in positions if p == 0}
        at_end = {n, n - 1} if av is sre.AT_END and text.endswith("\n") else {n}
        return positions & at_end
    if op is sre.SUBPATTERN:
        return _ends(av[3], text, positions)
    if op is sre.BRANCH:
        return set().union(*(_ends(body, text, positions) for body in av[1]))
    low, high, body = av  # a repeat: follow new positions only, once the minimum count is reached
    frontier, reached, count = set(positions), set(positions) if low == 0 else set(), 0
    while frontier and count < high:
        frontier = _ends(body, text, frontier)
        count += 1
        if count >= low:
            frontier -= reached
            reached |= frontier
    return reached


def _in_class(items, char: str) -> bool:
    code, negate, found = ord(char), False, False
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            found |= code == av
        elif op is sre.RANGE:
            found |= av[0] <= code <= av[1]
        elif op is sre.CATEGORY:
            found |= _CATEGORIES[av](char) is not None
    return found != negate
