"""Specification of the oracle's teacher-forced scoring (no engine, no model): a near-tie decided
the other way passes, a token the reference would not produce fails."""

import pytest
import torch

from nightshift.validation.oracle import score_tokens

pytestmark = pytest.mark.fast


def distribution(*logits: float):
    return torch.log_softmax(torch.tensor([list(logits)]), dim=-1)


def test_the_references_best_token_is_accepted():
    [verdict] = score_tokens(distribution(5.0, 1.0, 0.0, -1.0), [0], top_k=5, tolerance=2.0)
    assert verdict == {"rank": 0, "gap": 0.0, "accepted": True}


def test_a_near_tie_decided_the_other_way_by_numerical_noise_is_accepted():
    [verdict] = score_tokens(distribution(3.01, 3.0, -4.0), [1], top_k=5, tolerance=2.0)
    assert verdict["rank"] == 1 and verdict["gap"] == pytest.approx(0.01, abs=1e-4) and verdict["accepted"]


def test_a_token_far_below_the_best_is_refused_even_inside_the_top_k():
    [verdict] = score_tokens(distribution(6.0, 1.0, 0.0), [1], top_k=5, tolerance=2.0)
    assert verdict["rank"] == 1 and verdict["gap"] == pytest.approx(5.0, abs=1e-4) and not verdict["accepted"]


def test_a_token_outside_the_top_k_is_refused_even_when_the_distribution_is_flat():
    flat = distribution(*[1.0 - 0.001 * i for i in range(100)])
    [verdict] = score_tokens(flat, [50], top_k=5, tolerance=2.0)
    assert verdict["rank"] == 50 and verdict["gap"] < 0.1 and not verdict["accepted"]


def test_every_position_is_scored_on_its_own():
    logprobs = torch.cat([distribution(2.0, 0.0), distribution(0.0, 2.0)])
    assert [v["accepted"] for v in score_tokens(logprobs, [0, 1], top_k=1, tolerance=1.0)] == [True, True]
    assert [v["accepted"] for v in score_tokens(logprobs, [0, 0], top_k=1, tolerance=1.0)] == [True, False]


def test_a_reference_too_big_for_this_host_is_skipped_with_the_reason(tmp_path):
    from nightshift.validation.gate import _too_big_here

    huge, small = tmp_path / "huge", tmp_path / "small"
    huge.mkdir(), small.mkdir()
    with open(huge / "model.safetensors", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse: more than any host here has free
    (small / "model.safetensors").write_bytes(b"\0" * 1024)
    reason = _too_big_here(str(huge), engine_here=False)
    assert reason.startswith("the reference weights (1024.0 GiB) do not fit this host's free memory")
    assert _too_big_here(str(small), engine_here=False) is None
    assert _too_big_here(str(huge), engine_here=True) is None, "the run's own engine re-runs the rows"
