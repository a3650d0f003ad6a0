"""Answer parsing: every branch of docs/formats.md's MME and POPE rules."""

import pytest

from sparsezip_pl.benchmarks.mme import parse_mme_answer
from sparsezip_pl.benchmarks.pope import parse_pope_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", "yes"),  # exact
        ("No", "no"),  # lower-cased
        ("  Yes.  ", "yes"),  # stripped, "." dropped
        ("n.o.", "no"),  # every "." dropped
        ("y", "yes"),  # single letter
        ("N", "no"),
        ("Y.", "yes"),
        ("Yes, there is a dog.", "yes"),  # "yes" in the first four characters
        ("No, there is not.", "no"),  # "no" in the first four characters
        ("nope", "no"),
        ("a yes", "other"),  # the first four characters "a ye" hold neither "yes" nor "no"
        ("I'm no expert", "other"),
        ("The answer is yes", "other"),  # neither in the first four characters
        ("maybe", "other"),
        ("", "other"),
        ("other", "other"),  # idempotent on the parsed label
    ],
)
def test_mme_rule(text, expected):
    assert parse_mme_answer(text) == expected


def test_mme_yes_checked_before_no():
    assert parse_mme_answer("yesno") == "yes"
    assert parse_mme_answer("noyes") == "no"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("There is not a dog in the image.", "no"),  # "not" anywhere in the first sentence
        ("No, there is no dog.", "no"),  # comma removed before splitting
        ("Yes. But no dog.", "yes"),  # only the text before the first "." counts
        ("Yes, no doubt", "no"),
        ("NO", "yes"),  # only "No", "no", "not" count (LLaVA's rule)
        ("None of them", "yes"),  # whole words only
        ("nothing", "yes"),
        ("no\nreally", "yes"),  # split on spaces only, as LLaVA does
        ("", "yes"),
    ],
)
def test_pope_rule(text, expected):
    assert parse_pope_answer(text) == expected
