"""Specification of canary expectations: each given expectation must hold, in words when not."""

import pytest

from nightshift.stages.canaries import check_expectations

pytestmark = pytest.mark.fast


def test_a_text_meeting_every_expectation_passes():
    assert (
        check_expectations(
            '{"label": "invoice"}',
            {
                "regex": "invoice",
                "min_length": 5,
                "max_length": 40,
                "json_schema": {"type": "object", "required": ["label"]},
            },
        )
        == []
    )
    assert check_expectations(" contract\n", {"one_of": ["invoice", "contract"]}) == []
    assert check_expectations("exactly this", {"exact": "exactly this"}) == []


@pytest.mark.parametrize(
    "text, expect, words",
    [
        ("The total is $1,520", {"regex": r"\$1,250"}, "does not match"),
        ("review", {"one_of": ["invoice", "contract"]}, "is not one of"),
        ("short", {"min_length": 10}, "shorter than 10"),
        ("x" * 50, {"max_length": 10}, "longer than 10"),
        ("not json", {"json_schema": {"type": "object"}}, "not JSON valid"),
        ("almost", {"exact": "almost!"}, "not exactly"),
        (None, {"regex": "."}, "failed to generate"),
    ],
)
def test_each_failed_expectation_is_named(text, expect, words):
    problems = check_expectations(text, expect)
    assert len(problems) == 1 and words in problems[0]
