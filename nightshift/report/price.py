"""The report's throughput and money: arithmetic on what was measured, and the prices of the
hardware the run used as itself (`nightshift.report.pricing`) — no I/O but the canary verdict's file."""

from __future__ import annotations

from nightshift.engine.sizing import throughput_traps
from nightshift.records import (
    EngineFigures,
    EngineTime,
    GpuFigures,
    ModelRows,
    Money,
    NotGenerated,
    Priced,
    Projection,
    RowTotals,
    Straggler,
    Throughput,
    ValidationFigures,
    Verdict,
)
from nightshift.report.pricing import ManagedPrices, Rate, RateSource
from nightshift.runtime.rundir import RunDir
from nightshift.stages.estimate import managed_api_cost


def engine_figures(time: EngineTime) -> EngineFigures:
    """The engine settings that really ran (the latest shard's engine), and the traps they show."""
    if not time.engine_settings:
        return EngineFigures()
    warnings = throughput_traps(time.engine_settings, on_gpu=time.gpu_count > 0)
    return EngineFigures(engine_settings=time.engine_settings, engine_warnings=warnings)


def priced(
    totals: RowTotals,
    time: EngineTime,
    pricing: RateSource,
    managed: ManagedPrices,
    project_rows: int = 1_000_000,
) -> Priced:
    """The report's throughput and money figures: arithmetic on what was measured, no I/O."""
    rate = pricing.rate(time.gpu_name, time.gpu_count)  # the hardware the run used, as itself
    bill = _Bill.of(totals, time, rate)
    money = _costs(totals, bill, rate.accelerator).model_copy(
        update={
            # an embedding run has prompt tokens only: it is priced against embedding APIs
            "managed_api_cost": managed_api_cost(
                totals.prompt_tokens,
                totals.completion_tokens,
                bool(totals.prompt_tokens and not totals.completion_tokens),
                managed.prices,
                managed.embedding_prices,
            ),
            "by_model": {name: _billed(part, bill) for name, part in totals.by_model.items()},
            "projection": _projection(totals, time, rate, project_rows),
        }
    )
    return Priced(**dict(_throughput(totals, time)), **dict(money), **dict(_gpu_figures(time)))


def _billed(part: ModelRows, bill: _Bill) -> ModelRows:
    """A model's rows with its part of the bill (its share of the tokens)."""
    share = _token_share(part, bill.tokens)
    return part.model_copy(
        update={"cost_on_demand": _share(bill.on_demand, share), "cost_spot": _share(bill.spot, share)}
    )


class _Bill:
    """What the run's accelerator time cost, on demand and spot (None where the hardware has no price)."""

    def __init__(self, hours: float, on_demand: float | None, spot: float | None, tokens: int, span: float) -> None:
        self.hours, self.on_demand, self.spot, self.tokens, self.span = hours, on_demand, spot, tokens, span

    @classmethod
    def of(cls, totals: RowTotals, time: EngineTime, rate: Rate) -> _Bill:
        hours = (time.slot_seconds or 0) / 3600 * rate.count
        on_demand = hours * rate.on_demand if rate.priced else None
        spot = hours * rate.spot if rate.priced else None
        return cls(hours, on_demand, spot, totals.prompt_tokens + totals.completion_tokens, time.span_seconds)

    def per_million(self, cost: float | None, count: int) -> float | None:
        return round(cost / (count / 1e6), 6) if count and self.span and cost is not None else None


def _share(cost: float | None, part: float) -> float | None:
    return None if cost is None else round(cost * part, 6)


def _throughput(totals: RowTotals, time: EngineTime) -> Throughput:
    span = time.span_seconds
    generated = totals.prompt_tokens + totals.completion_tokens - totals.tokens_not_generated  # the engine's work
    return Throughput(
        max_model_len=time.max_model_len,  # the context the engine ran with (the model's own unless set)
        generate_seconds=round(span, 3) if span else None,
        engine_seconds_summed=round(time.engine_seconds, 3) if time.engine_seconds else None,
        engine_slots=time.slots,
        tokens_per_second=round(generated / span, 2) if span else None,
        output_tokens_per_second=round(totals.completion_tokens / span, 2) if span else None,
        rows_per_second=round(totals.rows / span, 2) if span and totals.rows else None,
        stragglers=[Straggler(shard=s, engine_seconds=sec, times_median=r) for s, sec, r in time.stragglers],
        prefix_cache_hit_rate=time.prefix_cache_hit_rate,
    )


def _costs(totals: RowTotals, bill: _Bill, accelerator: str) -> Money:
    """The bill, whole and per million tokens, output tokens and rows (the comparisons with the
    managed APIs, the models' shares and the projection are `priced`'s)."""
    generated = bill.tokens - totals.tokens_not_generated
    saved = (_share(bill.on_demand, totals.tokens_not_generated / generated) or 0.0) if generated else 0.0
    return Money(
        accelerator=accelerator,
        # deterministic rows answered by an identical row or the result cache: tokens and $ not spent
        served_without_generating=NotGenerated(
            rows=totals.rows_not_generated, tokens=totals.tokens_not_generated, cost_saved_on_demand=saved
        ),
        accelerator_hours=round(bill.hours, 6),
        cost_on_demand=_share(bill.on_demand, 1.0),
        cost_spot=_share(bill.spot, 1.0),
        cost_per_million_tokens=bill.per_million(bill.on_demand, bill.tokens),
        cost_per_million_tokens_spot=bill.per_million(bill.spot, bill.tokens),
        cost_per_million_output_tokens=bill.per_million(bill.on_demand, totals.completion_tokens),
        cost_per_million_output_tokens_spot=bill.per_million(bill.spot, totals.completion_tokens),
        cost_per_million_rows=bill.per_million(bill.on_demand, totals.rows),
        cost_per_million_rows_spot=bill.per_million(bill.spot, totals.rows),
    )


def _gpu_figures(time: EngineTime) -> GpuFigures:
    """The accelerator figures the engine time measured, under the same names."""
    return GpuFigures(**time.model_dump(include=set(GpuFigures.model_fields)))


def _projection(totals: RowTotals, time: EngineTime, rate: Rate, rows: int) -> Projection:
    rows_per_second = totals.rows / time.span_seconds if time.span_seconds else None

    def projected(per_hour: float | None) -> float | None:
        if not rows_per_second or per_hour is None:
            return None
        return round(rows / rows_per_second / 3600 * max(time.slots, 1) * rate.count * per_hour, 4)

    return Projection(
        rows=rows,
        hours=round(rows / rows_per_second / 3600, 3) if rows_per_second else None,
        cost_on_demand=projected(rate.on_demand),
        cost_spot=projected(rate.spot),
    )


def validation_figures(run_dir: RunDir, rate: Rate) -> ValidationFigures:
    """The canary checks' verdict of this run, if one was written after its plan."""
    if not (
        run_dir.validation.exists() and run_dir.validation.stat().st_mtime >= run_dir.plan_manifest.stat().st_mtime
    ):
        return ValidationFigures()  # not validated (yet): report.json leaves these out
    verdict = Verdict.load(run_dir.validation)
    # what the checks cost, at the accelerator's price (the re-run holds the engine meanwhile)
    cost = round((verdict.seconds or 0) / 3600 * rate.count * rate.on_demand, 6) if rate.priced else None
    return ValidationFigures(
        validated=verdict.validated,
        validation_state=verdict.verdict,
        validation_failures=verdict.failures,
        validation_seconds=verdict.seconds,
        validation_cost_on_demand=cost,
        validation_checks=verdict.summaries(),
    )


def _token_share(share: ModelRows, total: int) -> float:
    """A model's part of the engine's work (and so of the bill): its tokens over the run's."""
    return (share.prompt_tokens + share.completion_tokens) / total if total else 0.0
