"""Regular expressions from files (lowbit.io.patterns): the answer `re.match` gives, in
bounded time, for the accepted subset; clear refusals outside it."""

import random
import re
import time

import pytest

from lowbit.errors import UsageError
from lowbit.io.patterns import SafePattern

ATOMS = ["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "[0-9]", "(a|b)", "(ab|a)", "(a*)", "^", "$", "x"]
QUANTIFIERS = ["", "", "*", "+", "?", "{1,2}", "{2}", "*?", "+?"]
NAMES = ["", "a", "ab", "aab", "ba", "aaaa", "x", "abx", "a.b", "a\n", "model.layers.10.mlp.down_proj",
         "lm_head", "model.layers.0.self_attn.q_proj"]


def test_matches_as_re_match_does():
    rng = random.Random(0)
    compared = 0
    for _ in range(3000):
        pattern = "".join(rng.choice(ATOMS) + rng.choice(QUANTIFIERS) for _ in range(rng.randint(1, 5)))
        try:
            safe = SafePattern(pattern)
        except UsageError:
            continue
        for name in NAMES:
            assert safe.match(name) == bool(re.match(pattern, name)), (pattern, name)
            compared += 1
    assert compared > 20000


@pytest.mark.parametrize("pattern", ["(.*)*x$", "(a|a)*b", "(a|aa)+$", "(.*.*.*.*.*.*)*x", "((a|b|.)*)*c$"])
def test_catastrophic_patterns_take_no_time(pattern):
    name = "a" * 60 + ".layers.12.self_attn.q_proj"
    start = time.perf_counter()
    assert not SafePattern(pattern).match(name)  # `re` would backtrack for ages here
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("pattern, message", [
    (r"(a)\1", "backreferences"), ("(?=a)", "lookarounds"), ("(?<!a)b", "lookarounds"),
    ("(?(1)a|b)", "not a valid regular expression|conditional"), ("(?i)a", "flags"), ("(?i:a)", "flags"),
    (r"\ba", "word boundaries"), ("(?>a*)", "atomic groups"), ("a*+", "possessive"),
    ("((a*)*)*", "nested too deeply"), ("a{1001}", "counts above 1000"), ("(", "not a valid regular expression"),
    ("a" * 1001, "longer than 1000"), (5, "must be a string"),
])
def test_refusals(pattern, message):
    with pytest.raises(UsageError, match=message):
        SafePattern(pattern)
