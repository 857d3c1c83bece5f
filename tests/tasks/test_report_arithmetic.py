"""Specification of the report's arithmetic on a synthetic run directory (no engine, no server):
billed hours add up each engine slot, $/1M tokens is the pricing block's arithmetic, and rows
answered without generating are counted apart."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
from nightshift.config import EngineConfig, JobSpec
from nightshift.records import Plan, Shard
from nightshift.report import build_report
from nightshift.runtime.rundir import RunDir
from nightshift.stages.chunks import shard_cache_key

pytestmark = pytest.mark.fast


def metrics(shard: int, host: str, started: float, seconds: float) -> dict:
    return {
        "shard_index": shard,
        "host": host,
        "engine_started": started,
        "engine_finished": started + seconds,
        "engine_seconds": seconds,
        "gpu_name": None,
        "gpu_count": 0,
        "gpu_util_mean": None,
        "gpu_mem_mib_mean": None,
        "gpu_power_w_mean": None,
        "gpu_telemetry": "no NVML",
        "max_model_len": 2048,
    }


@pytest.fixture
def run_dir(tmp_path):
    run = RunDir(tmp_path / "run")
    job = JobSpec(engine=EngineConfig(model="m"), served_model_name="m", model_identity="x")
    shards = [Shard(index=i, path=f"s{i}", first_row=2 * i, num_rows=2, content_hash=f"{i}" * 64) for i in range(2)]
    Plan(input_path="in.jsonl", input_kind="openai-batch", total_rows=4, shards=shards).save(run.plan_manifest)
    job.save(run.job)
    # two engines side by side on two hosts: 3,600 s each, spanning 5,400 s of wall time
    for shard, host, started in ((shards[0], "gpu-a", 0.0), (shards[1], "gpu-b", 1800.0)):
        out = run.shard_output(shard_cache_key(shard, job))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(metrics(shard.index, host, started, 3600.0)))
    pq.write_table(
        pa.table(
            {
                "custom_id": ["a", "b", "c", "d"],
                "text": ["x", "x", "y", None],
                "finish_reason": ["stop", "stop", "length", None],
                "prompt_tokens": [100, 100, 300, None],
                "completion_tokens": [50, 50, 150, None],
                "shard": [0, 0, 1, 1],
                "source": ["engine", "duplicate", "engine", None],
            }
        ),
        run.results,
    )
    return run


def test_billed_hours_add_up_each_engine_slot_and_cost_follows_the_pricing_block(run_dir):
    pricing = GpuPricing(accelerator="H100", accelerators=2, on_demand_per_hour=4.0, spot_per_hour=1.5)
    report = build_report(run_dir, pricing, ManagedApiPrices())
    assert report.engine_slots == 2 and report.generate_seconds == 5400.0
    assert report.accelerator_hours == pytest.approx(2 * 1.0 * 2)  # two slots of one hour, two GPUs each
    assert report.cost_on_demand == pytest.approx(16.0) and report.cost_spot == pytest.approx(6.0)
    assert report.total_tokens == 750 and report.rows == 4 and report.failed == 1
    assert report.cost_per_million_tokens == pytest.approx(16.0 / 750 * 1e6)
    assert report.truncation_share == pytest.approx(1 / 3, abs=1e-4)
    assert report.max_model_len == 2048


def test_rows_answered_without_generating_are_counted_apart_with_the_money_they_saved(run_dir):
    report = build_report(run_dir, GpuPricing(on_demand_per_hour=4.0, accelerators=1), ManagedApiPrices())
    saved = report.served_without_generating
    generated = 750 - 150  # the duplicate's 150 tokens were never generated
    assert saved.rows == 1 and saved.tokens == 150
    assert report.tokens_per_second == pytest.approx(generated / 5400, abs=0.005)  # rounded to 2 places
    assert saved.cost_saved_on_demand == pytest.approx(report.cost_on_demand * 150 / generated, rel=1e-3)


def test_pricing_is_arithmetic_on_the_measured_records_alone():
    from nightshift.blocks.pricing import ManagedApiPrices
    from nightshift.records import EngineTime, RowTotals
    from nightshift.report import priced

    totals = RowTotals(
        rows=1000, succeeded=990, prompt_tokens=200_000, completion_tokens=50_000, truncation_share=0.0,
        rows_not_generated=0, tokens_not_generated=0,
    )  # fmt: skip
    # two slots of 30 minutes each, side by side over 40 minutes of wall time
    time = EngineTime(span_seconds=2400.0, slot_seconds=3600.0, slots=2)
    figures = priced(totals, time, GpuPricing(accelerators=1, on_demand_per_hour=3.0, spot_per_hour=1.0),
                     ManagedApiPrices(), project_rows=1_000_000)  # fmt: skip
    assert figures.accelerator_hours == 1.0 and figures.cost_on_demand == 3.0 and figures.cost_spot == 1.0
    assert figures.cost_per_million_tokens == pytest.approx(3.0 / 0.25)
    assert figures.rows_per_second == pytest.approx(1000 / 2400, abs=0.005)
    # a million rows at this speed: 1e6 / (1000 / 2400) s on each of the two slots
    assert figures.projection.hours == pytest.approx(1e6 * 2400 / 1000 / 3600, rel=1e-3)
    assert figures.projection.cost_on_demand == pytest.approx(1e6 * 2400 / 1000 / 3600 * 2 * 3.0, rel=1e-3)
    embedding = RowTotals(
        rows=10, succeeded=10, prompt_tokens=5000, completion_tokens=0, truncation_share=0.0,
        rows_not_generated=0, tokens_not_generated=0,
    )  # fmt: skip
    apis = priced(embedding, time, GpuPricing(), ManagedApiPrices()).managed_api_cost
    assert all("embedding" in name for name in apis), "prompt tokens only: priced against embedding APIs"
    nothing_ran = priced(totals, EngineTime(), GpuPricing(), ManagedApiPrices())
    assert nothing_ran.cost_per_million_tokens is None and nothing_ran.projection.hours is None


def test_a_run_is_priced_as_the_card_nvml_named_and_an_unknown_card_is_unpriced():
    from nightshift.blocks.pricing import ACCELERATOR_PRICES, ManagedApiPrices, catalog_entry
    from nightshift.records import EngineTime, RowTotals
    from nightshift.report import priced

    for nvml, key in [
        ("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("Tesla T4", "T4"),
        ("NVIDIA RTX PRO 6000", None),
    ]:  # fmt: skip
        assert catalog_entry(nvml, ACCELERATOR_PRICES) == key, nvml
    totals = RowTotals(
        rows=10, succeeded=10, prompt_tokens=10**6, completion_tokens=10**6, truncation_share=0.0,
        rows_not_generated=0, tokens_not_generated=0,
    )  # fmt: skip
    one_hour = {"span_seconds": 3600.0, "slot_seconds": 3600.0, "slots": 1}
    on_h200 = priced(
        totals, EngineTime(**one_hour, gpu_name="NVIDIA H200", gpu_count=2), GpuPricing(), ManagedApiPrices()
    )
    assert on_h200.accelerator == "H200" and on_h200.accelerator_hours == 2.0
    assert on_h200.cost_on_demand == 2 * ACCELERATOR_PRICES["H200"]["on_demand"]
    on_cpu = priced(totals, EngineTime(**one_hour), GpuPricing(), ManagedApiPrices())
    assert on_cpu.accelerator == "cpu-2vcpu" and on_cpu.cost_on_demand == ACCELERATOR_PRICES["cpu-2vcpu"]["on_demand"]
    unknown = priced(totals, EngineTime(**one_hour, gpu_name="NVIDIA RTX PRO 6000", gpu_count=1), GpuPricing(),
                     ManagedApiPrices())  # fmt: skip
    assert unknown.accelerator == "NVIDIA RTX PRO 6000 (unpriced)"
    assert unknown.cost_on_demand is None and unknown.cost_per_million_tokens is None
    assert unknown.projection.cost_on_demand is None
    given = priced(totals, EngineTime(**one_hour, gpu_name="NVIDIA RTX PRO 6000", gpu_count=1),
                   GpuPricing(accelerator="rtx-pro", on_demand_per_hour=1.5), ManagedApiPrices())  # fmt: skip
    assert given.accelerator == "rtx-pro" and given.cost_on_demand == 1.5 and given.cost_spot == 1.5
