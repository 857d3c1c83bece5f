"""The plan's arithmetic, hand-computed: GPUs to finish by a deadline, hours and cost, and what
it says when it does not know."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from nightshift.config import EngineConfig, JobSpec
from nightshift.stages.estimate import Throughput, TokenCount, estimate, render, throughput_from_history

pytestmark = pytest.mark.fast

NOW = datetime(2026, 11, 26, 22, 0, tzinfo=timezone.utc)
TOKENS = TokenCount(
    rows=1010,
    valid_rows=1000,
    rejected_by_code={"invalid_json": 10},
    shards=10,
    prompt_tokens=600_000,
    completion_tokens_max=400_000,
    shard_tokens_max=120_000,
)
MEASURED = Throughput(
    tokens_per_second=500, source="history: 1 earlier run", completion_per_row=200, straggler_factor=1.5
)


def plan(**overrides):
    arguments = dict(
        tokens=TOKENS,
        model="m",
        accelerator="h100",
        throughput=MEASURED,
        on_demand_per_hour=2.0,
        spot_per_hour=0.6,
        managed_prices={"api": {"input": 0.075, "output": 0.30}},
        deadline=NOW + timedelta(minutes=10),
        now=NOW,
    )
    return estimate(**{**arguments, **overrides})


def test_the_fleet_finishes_the_work_before_the_deadline_less_the_largest_shard():
    result = plan()
    # completion: 1,000 rows × 200 per row = 200,000 (under the 400,000 bound); total 800,000
    assert result.completion_tokens_estimate == 200_000
    # W = 800,000 / 500 = 1,600 s; the largest shard's 120,000 tokens scaled by 0.8, at 500/s,
    # × 1.5 straggler factor = 288 s; GPUs = ceil(1,600 / (600 − 288)) = ceil(5.13) = 6
    assert result.gpus_needed == 6 and result.finishes_in_time
    assert result.hours_one_gpu == pytest.approx(1600 / 3600, abs=1e-4)
    assert result.cost_on_demand == pytest.approx(1600 / 3600 * 2.0, abs=1e-5)
    assert result.cost_spot == pytest.approx(1600 / 3600 * 0.6, abs=1e-5)
    # 0.6M input × $0.075 + 0.2M output × $0.30
    assert result.managed_api_cost == {"api": pytest.approx(0.105)}


def test_gpu_hours_count_every_accelerator_an_engine_spans():
    assert plan(accelerators_per_engine=4).cost_on_demand == pytest.approx(4 * 1600 / 3600 * 2.0, abs=1e-5)


def test_a_deadline_the_largest_shard_alone_misses_is_said_plainly():
    result = plan(deadline=NOW + timedelta(seconds=200))
    assert result.gpus_needed is None and result.finishes_in_time is False
    assert "largest shard alone takes 0.08 h" in result.why_not
    assert "cannot finish in time" in render(result)


def test_without_history_the_completion_is_the_bound_and_speed_is_unknown_never_invented():
    result = plan(throughput=None)
    assert result.completion_tokens_estimate == 400_000
    assert result.hours_one_gpu is None and result.gpus_needed is None and result.cost_on_demand is None
    text = render(result)
    assert "throughput per GPU | unknown" in text and "GPUs to finish by the deadline | unknown" in text
    assert "invalid_json=10" in text and "600,000" in text


def test_an_embedding_job_has_no_completion_and_is_priced_as_embeddings():
    tokens = TOKENS.model_copy(update={"embedding": True, "completion_tokens_max": 0})
    result = plan(tokens=tokens, embedding_prices={"emb": 0.02}, deadline=None)
    assert result.completion_tokens_estimate == 0 and result.managed_api_cost == {"emb": pytest.approx(0.012)}
    assert result.hours_one_gpu == pytest.approx(600_000 / 500 / 3600, abs=1e-4)


def write_run(root, name, job, accelerator, **report):
    run = root / name
    run.mkdir()
    job.save(run / "job.json")
    base = {"rows": 100, "failed": 0, "completion_tokens": 3000, "tokens_per_second": 800.0, "engine_slots": 1}
    (run / "report.json").write_text(json.dumps({**base, "accelerator": accelerator, **report}))


def test_history_is_earlier_runs_of_the_same_model_on_the_same_accelerator(tmp_path):
    job = JobSpec(engine=EngineConfig(model="/models/a"), served_model_name="a", model_identity="weights-a")
    other = job.model_copy(update={"model_identity": "weights-b"})
    write_run(tmp_path, "night-1", job, "h100", stragglers=[{"times_median": 1.4}])
    write_run(tmp_path, "night-2", job, "h100", tokens_per_second=1200.0, engine_slots=2, failed=40)
    write_run(tmp_path, "other-model", other, "h100", tokens_per_second=99999.0)
    write_run(tmp_path, "other-gpu", job, "a10g", tokens_per_second=99999.0)
    write_run(tmp_path, "from-cache", job, "h100", served_without_generating={"rows": 50}, tokens_per_second=99999.0)

    found = throughput_from_history(tmp_path, job, "h100")
    assert found.tokens_per_second == pytest.approx((800 + 1200 / 2) / 2)  # per GPU: night-2 ran on 2
    assert found.completion_per_row == pytest.approx((3000 / 100 + 3000 / 60) / 2)
    assert found.straggler_factor == 1.4 and found.source.startswith("history: 2 earlier runs")
    assert throughput_from_history(tmp_path, job, "l4") is None


def test_a_history_run_with_a_measured_hit_rate_prices_this_layouts_predicted_one(tmp_path):
    job = JobSpec(engine=EngineConfig(model="/models/a"), served_model_name="a", model_identity="weights-a")
    # 9,000 prompt tokens of which the cache served 2/3, 3,000 written, at 800 tokens/s: the
    # engine computed 3,000 + 3,000 = 6,000 of the 12,000 tokens, 400 per second.
    write_run(tmp_path, "night-1", job, "h100", prompt_tokens=9000, prefix_cache_hit_rate=2 / 3)
    rate = throughput_from_history(tmp_path, job, "h100")
    assert rate.computed_per_second == pytest.approx(400)

    shared = TOKENS.model_copy(
        update={"prefix_cache_hit_rate_predicted": 0.5, "prefix_cache_hit_rate_input_order": 0.1}
    )
    planned = plan(tokens=shared, throughput=rate, deadline=None)
    completion = planned.completion_tokens_estimate
    assert completion == 30 * 1000, "30 completion tokens per row, as in the history"
    assert planned.hours_one_gpu == pytest.approx((600_000 * 0.5 + completion) / 400 / 3600, rel=1e-3)
    assert planned.hours_saved_by_layout == pytest.approx(600_000 * 0.4 / 400 / 3600, rel=1e-3)
    assert "saved by the layout" in render(planned)

    unknown = plan(tokens=TOKENS, throughput=rate, deadline=None)  # no prediction: total ÷ tokens/s, as before
    assert unknown.hours_one_gpu == pytest.approx((600_000 + completion) / 800 / 3600, rel=1e-3)
    assert unknown.hours_saved_by_layout is None


def test_a_history_without_measured_hit_rates_keeps_the_plain_rate():
    planned = plan(tokens=TOKENS.model_copy(update={"prefix_cache_hit_rate_predicted": 0.5}), deadline=None)
    assert planned.hours_one_gpu == pytest.approx((600_000 + 200 * 1000) / 500 / 3600, rel=1e-3)
    assert planned.hours_saved_by_layout is None


def test_the_input_order_prediction_replays_the_input_whatever_the_shards_layout(tmp_path):
    """Shards regrouped by prefix are not the input order: the prediction for the input order
    still replays the rows as the file holds them (what --keep-order would send)."""
    import random

    from conftest import chat_request, write_jsonl

    from nightshift.jobs import make_job
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.estimate import count_tokens, load_tokenizer
    from nightshift.stages.plan import plan

    rows = [
        chat_request(f"d{d}q{q}", f"Document {d}: " + f"clause {d} " * 150 + f"Q{q}?")
        for d in range(8)
        for q in range(6)
    ]
    random.Random(1).shuffle(rows)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    regrouped = plan(str(path), RunDir(tmp_path / "a"), shard_size=12)
    slices = plan(str(path), RunDir(tmp_path / "b"), shard_size=12, group_prefixes=False)
    assert (regrouped.layout, slices.layout) == ("prefix-groups", "input-slices")
    tokenizer, cache = load_tokenizer(make_job("tiny")), (3000, 128)  # about four documents' blocks

    laid_out, as_sliced = count_tokens(regrouped, tokenizer, 2048, cache), count_tokens(slices, tokenizer, 2048, cache)

    assert laid_out.prefix_cache_hit_rate_input_order == as_sliced.prefix_cache_hit_rate_input_order
    assert laid_out.shards_regrouped and not as_sliced.shards_regrouped
    assert laid_out.prompt_tokens == as_sliced.prompt_tokens
    # measured here: 0.81 regrouped, 0.46 with each input slice laid out alone, 0.18 in input order
    assert laid_out.prefix_cache_hit_rate_predicted > as_sliced.prefix_cache_hit_rate_predicted + 0.2
