"""Specification of the oracle's text comparison (no engine, no model)."""

import pytest
from nightshift.tasks.canary import texts_agree

pytestmark = pytest.mark.fast


def test_a_reference_cut_inside_a_multibyte_character_agrees_with_the_whole_character():
    # byte-level tokens: the 8th token ends inside "ă"; decoding 8 tokens gives U+FFFD there
    assert texts_agree("orthwinarchveryY3645oveă and more", "orthwinarchveryY3645ove\ufffd")


def test_a_different_continuation_disagrees():
    assert not texts_agree("orthwinarchveryY3646oveă", "orthwinarchveryY3645ove\ufffd")
    assert not texts_agree("The total is $1,250.", "The total is $1,520")


def test_a_run_text_shorter_than_the_reference_agrees_when_it_is_its_prefix():
    assert texts_agree("The total", "The total is")
    assert not texts_agree("The sum", "The total is")
