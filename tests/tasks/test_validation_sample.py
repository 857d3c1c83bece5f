"""Specification of how validation picks its rows: a reproducible uniform sample of the run,
read as a stream, holding only the sample however many rows the run has."""

import pytest

from nightshift.tasks.s5_canary import _Sample

pytestmark = pytest.mark.fast


def sample_of(stream, size: int) -> list:
    sample = _Sample(size)
    for item in stream:
        if (slot := sample.slot()) is not None:
            sample.items[slot] = item
    return sample.chosen()


def test_the_same_run_gives_the_same_sample():
    assert sample_of(range(100_000), 8) == sample_of(range(100_000), 8)


def test_a_short_run_is_sampled_whole_in_random_order():
    chosen = sample_of(range(5), 8)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    assert chosen != [0, 1, 2, 3, 4]


def test_a_long_run_is_sampled_from_end_to_end_not_from_its_first_rows():
    chosen = sample_of(range(100_000), 200)
    assert len(set(chosen)) == 200
    assert sum(item < 50_000 for item in chosen) in range(70, 131)  # half, within a wide margin
    assert max(chosen) > 90_000


def test_an_item_is_only_built_when_chosen():
    sample, built = _Sample(10), 0
    for item in range(100_000):
        if (slot := sample.slot()) is not None:
            sample.items[slot] = item
            built += 1
    assert built < 200  # ~ size × (1 + ln(stream / size)) = 93, not 100,000
