"""Canary stage: gate the run on evidence that its answers are right.

The checks, each reported (rows chosen by nightshift.validation.rows; docs/canaries.md):

1. **Expectations** — the canary rows (which rode inside the real shards) must meet their
   expectations; at least `min_pass_rate` of them must pass.
2. **Oracle** — chat and completions rows sampled from the run: a greedy row's first
   `oracle_tokens` tokens scored teacher-forced by transformers on the reference weights (each
   in the reference's top k and within the tolerance of its best); a sampled row's kept tokens
   no more surprising to the reference than its own sampling would be. Skipped, saying why,
   where there is no reference of the weights that answered.
3. **Determinism** — greedy rows (constrained too) and seeded sampled rows re-asked through the
   engine must say the same.
4. **Settings gate** — greedy rows' tokens scored under a contrasting throughput setting
   (nightshift.validation.settings_gate).
5. **Embedding oracle** — embedded texts again with transformers on the reference weights;
   each vector's cosine to the run's must reach `embedding_min_cosine`.

A verdict is validated (a check ran, all passed), failed, or not validated (none applied, each
saying why). On failure the flow run fails naming what failed, the outputs stay on disk,
`validation.json` says `"validated": false`, and `nightshift run` exits 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from nightshift.config import CanaryConfig, JobSpec
from nightshift.engine.lora import local_adapter
from nightshift.fleet.workers import worker_identity
from nightshift.models import local_model, weight_bytes
from nightshift.records import (
    CanariesCheck,
    CanaryOutcome,
    Check,
    DeterminismCheck,
    DeterminismOutcome,
    EmbeddingOracleCheck,
    EmbeddingOutcome,
    OracleCheck,
    OracleOutcome,
    SkippedCheck,
    Verdict,
)
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, sql_path
from nightshift.stages.canaries import CANARY_PREFIX, check_expectations, load_canaries
from nightshift.validation.oracle import oracle_check, reference_class
from nightshift.validation.rows import checkable_rows, embedded_rows, rerun_text, rerun_token_ids
from nightshift.validation.settings_gate import settings_gate


def validate(run_dir: RunDir, job: JobSpec, config: CanaryConfig) -> Verdict:
    """The verdict on the merged run in `run_dir` (checks, failures, where they ran); the caller
    decides where it is written."""
    started = time.monotonic()
    checks: dict[str, tuple[Check, str | None]] = {}  # name → (the check, why it failed or None)
    if config.canaries:
        checks["canaries"] = _canaries_check(run_dir, config)
    checks.update(_engine_checks(run_dir, job, config))
    if embedded := embedded_rows(run_dir, job, config.oracle_samples):
        checks["embedding_oracle"] = _embedding_check(embedded, job, config)
    if not checks:  # nothing to sample: say so, per check, rather than pass with no check at all
        for name, wanted in (("oracle", config.oracle_samples), ("determinism", config.determinism_samples)):
            why = _NOTHING_TO_SAMPLE if wanted else f"turned off (--{name}-samples 0)"
            checks[name] = (SkippedCheck(skipped=why), None)
    failures = [failure for _, failure in checks.values() if failure]
    ran = [name for name, (check, _) in checks.items() if not isinstance(check, SkippedCheck)]
    if config.require_validation and not ran and not failures:
        failures.append("no check applied and --require-validation is set: " + "; ".join(
            f"{name}: {check.skipped}" for name, (check, _) in checks.items()
        ))  # fmt: skip
    state = "failed" if failures else "validated" if ran else "not_validated"
    return Verdict(
        validated=state == "validated",
        state=state,
        checks={name: check for name, (check, _) in checks.items()},
        failures=failures,
        seconds=round(time.monotonic() - started, 2),
        where={**worker_identity().model_dump(), "flow_run_id": _flow_run_id()},
    )


_NOTHING_TO_SAMPLE = (
    "it samples chat and completions rows with a text prompt (embeddings for the embedding oracle), and this run "
    "has none that succeeded: its rows are token-id prompts, embeddings or failed"
)


_NONE_FOR = {  # why a check has no row among the run's generated ones
    "oracle": "greedy and unconstrained, or sampled without a seed (scored for plausibility), with a text-only prompt",
    "determinism": "greedy (constrained too) or sampled with a seed",
    "settings_gate": "greedy and unconstrained with a text-only prompt",
}


def _engine_checks(run_dir: RunDir, job: JobSpec, config: CanaryConfig) -> dict[str, tuple[Check, str | None]]:
    """The oracle, the determinism re-ask and the settings gate, each on rows it can judge."""
    wanted = {"oracle": config.oracle_samples, "determinism": config.determinism_samples,
              "settings_gate": config.settings_gate_samples}  # fmt: skip
    pools = checkable_rows(run_dir, job, max(wanted.values()))
    if not pools.generated:
        return {}
    chosen = {name: pools.of(name, count) for name, count in wanted.items() if count}
    among = f"none of the run's {pools.generated} chat and completions rows is "
    checks = {name: (SkippedCheck(skipped=among + _NONE_FOR[name]), None) for name, rows in chosen.items() if not rows}
    chosen = {name: rows for name, rows in chosen.items() if rows}
    if not chosen:
        return checks
    if cannot := _cannot_check_here(job, config):
        return {**checks, **{name: (SkippedCheck(skipped=cannot), None) for name in chosen}}
    on_the_engine, again = _checks_on_the_engine(chosen, job, config)
    checks.update(on_the_engine)
    if "oracle" in chosen:
        no_reference = _no_reference_here(job, config) or _not_a_text_model(local_model(config.reference(job)))
        checks["oracle"] = (SkippedCheck(skipped=no_reference), None) if no_reference else _oracle_check(
            chosen["oracle"], again, job, config
        )  # fmt: skip
    return checks


def _checks_on_the_engine(chosen: dict[str, list[dict]], job: JobSpec, config: CanaryConfig) -> tuple[dict, dict]:
    """One re-run serves the determinism check (its text), the oracle (its token ids: re-tokenizing
    the text may split it otherwise) and the settings gate (prompt and answer token ids); then the
    gate. An engine started for them (for the re-run, or the gate's contrast, which replaced the
    run's) is shut down after: on a GPU, the reference needs its memory.
    Returns the checks and the re-run's outputs (custom_id → output)."""
    from nightshift.engine.local import current_engine, shutdown_engine  # vLLM: only where rows are re-run

    held = current_engine()  # the run's engine, or None
    rows = {row["custom_id"]: row for rows in chosen.values() for row in rows if row["body"]["temperature"] == 0
            or row["body"].get("seed") is not None}  # fmt: skip
    again = _rerun(list(rows.values()), job) if rows else {}
    checks: dict = {}
    if "determinism" in chosen:
        checks["determinism"] = _determinism_check(chosen["determinism"], again)
    if "settings_gate" in chosen:
        checks["settings_gate"] = _settings_gate(chosen["settings_gate"], again, job, config)
    if current_engine() is not held:  # one loaded for the re-run, or the gate's contrast
        shutdown_engine()
    return checks, again


def _settings_gate(samples: list[dict], again: dict, job: JobSpec, config: CanaryConfig):
    if job.engine.engine_url:
        return SkippedCheck(skipped=_GATE_NEEDS_THE_ENGINE), None
    return settings_gate(samples, again, job, config)


_GATE_NEEDS_THE_ENGINE = (
    "the run's rows went to an engine server (--engine-url), whose prompt log-probabilities under a contrasting "
    "setting this process cannot ask for: the gate scores on the in-process engine"
)


def _cannot_check_here(job: JobSpec, config: CanaryConfig) -> str | None:
    """Why no row can be re-run or scored in this process: the reference (and an engine for the
    re-run) does not fit beside nothing here."""
    from nightshift.engine.local import current_engine  # vLLM: only where there are rows to re-run

    return _too_big_here(local_model(config.reference(job)), current_engine() is not None)


def _canaries_check(run_dir: RunDir, config: CanaryConfig) -> tuple[CanariesCheck, str | None]:
    """The canary rows that rode inside the shards against their expectations."""
    expected = {row.custom_id: expect for row, expect in load_canaries(config.canaries)}
    with duckdb_connection() as con:
        got = dict(
            con.sql(f"SELECT custom_id, text FROM read_parquet('{sql_path(run_dir.canary_results)}')").fetchall()
        )
    results = []
    for custom_id, expect in expected.items():
        problems = check_expectations(got.get(custom_id), expect)
        canary = custom_id.removeprefix(CANARY_PREFIX)
        results.append(CanaryOutcome(canary=canary, passed=not problems, problems=problems, text=got.get(custom_id)))
    pass_rate = sum(r.passed for r in results) / len(results)
    check = CanariesCheck(pass_rate=pass_rate, min_pass_rate=config.min_pass_rate, results=results)
    if pass_rate >= config.min_pass_rate:
        return check, None
    failed = [f"{r.canary} ({'; '.join(r.problems)})" for r in results if not r.passed]
    return check, f"canaries passed {pass_rate:.0%} < {config.min_pass_rate:.0%}: " + ", ".join(failed)


def _oracle_check(
    samples: list[dict], again: dict, job: JobSpec, config: CanaryConfig
) -> tuple[OracleCheck, str | None]:
    """The run's tokens scored teacher-forced by transformers on the reference weights (with a
    row's adapter merged in)."""
    references = {name: config.reference_adapter(job, name) for name in {s["adapter"] for s in samples} if name}
    memory = _room_for_the_reference(local_model(config.reference(job)))
    scored = oracle_check(
        [
            {**s, "token_ids": s.get("token_ids") or rerun_token_ids(again.get(s["custom_id"]), s["text"])}
            for s in samples
        ],
        local_model(config.reference(job)),
        config.oracle_tokens,
        config.oracle_top_k,
        config.oracle_logprob_tolerance,
        {name: local_adapter(adapter) for name, adapter in references.items()},
    )
    oracle = [OracleOutcome(**outcome) for outcome in scored]
    agreement = sum(o.agrees for o in oracle) / len(oracle)
    check = OracleCheck(
        agreement=agreement,
        min_agreement=config.oracle_min_agreement,
        reference=config.reference(job),
        adapter_references={name: adapter.path for name, adapter in references.items()},
        tokens=config.oracle_tokens,
        top_k=config.oracle_top_k,
        logprob_tolerance=config.oracle_logprob_tolerance,
        results=oracle,
        memory=memory,
    )
    if agreement >= config.oracle_min_agreement:
        return check, None
    disagree = [o.custom_id for o in oracle if not o.agrees]
    return check, (
        f"oracle agreement {agreement:.0%} < {config.oracle_min_agreement:.0%} "
        f"(the run's tokens are not what transformers on the reference weights expects for {', '.join(disagree)})"
    )


def _no_reference_here(job: JobSpec, config: CanaryConfig) -> str | None:
    """Why the oracle has no reference for an engine server's answers: the server answers as a
    model that is not the job's local one, and no --oracle-model names its weights. None when the
    reference is the run's own (in-process engine, a server of the same name) or was given."""
    if not job.engine.engine_url or config.oracle_model:
        return None
    from nightshift.engine.local import current_engine

    served = getattr(current_engine(), "served_model", None)
    model = job.engine.model
    if served is None or served in {job.served_model_name, model, os.path.basename(model.rstrip("/"))}:
        return None
    return (
        f"the engine server answers as {served!r}, not as this job's local {job.served_model_name!r}: no reference "
        "of its weights here (give --oracle-model the same weights, or --model the name it serves)"
    )


def _room_for_the_reference(reference: str) -> str | None:
    """On a GPU, room on the card for the reference beside the run's engine (which holds most
    of it): where the reference would not fit the memory left free, the engine — done with the
    run and the re-run — is shut down first. Says which; None off a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from nightshift.engine.local import current_engine, shutdown_engine

    needed = 1.25 * weight_bytes(reference)  # 16-bit weights and the activations of a few short samples
    free = torch.cuda.mem_get_info()[0]
    if needed <= free or current_engine() is None:
        return f"beside the engine: {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
    shutdown_engine()
    return (
        f"the run's engine was shut down first: the reference needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB "
        f"were free beside it, {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB after"
    )


def _embedding_check(
    embedded: list[dict], job: JobSpec, config: CanaryConfig
) -> tuple[EmbeddingOracleCheck, str | None]:
    """The run's vectors against transformers' on the reference weights."""
    reference = config.reference(job)
    checked = _embedding_oracle(embedded, local_model(reference))
    check = EmbeddingOracleCheck(
        min_cosine=min(c.cosine for c in checked),
        required=config.embedding_min_cosine,
        reference=reference,
        results=checked,
    )
    below = [c.custom_id for c in checked if c.cosine < config.embedding_min_cosine]
    if not below:
        return check, None
    return check, (
        f"embedding cosine below {config.embedding_min_cosine} against transformers on the reference "
        f"weights for {', '.join(below)}"
    )


def _determinism_check(samples: list[dict], again: dict) -> tuple[DeterminismCheck, str | None]:
    """Sampled rows re-run with the same parameters, seed included, must say the same."""
    rerun = [
        DeterminismOutcome(custom_id=s["custom_id"], same=rerun_text(again.get(s["custom_id"])) == s["text"])
        for s in samples
    ]
    check = DeterminismCheck(same=sum(r.same for r in rerun), of=len(rerun), results=rerun)
    if all(r.same for r in rerun):
        return check, None
    return check, "re-running with the same seed changed the output of " + ", ".join(
        r.custom_id for r in rerun if not r.same
    )


def _embedding_oracle(samples: list[dict], reference: str) -> list[EmbeddingOutcome]:
    """Each sample's text embedded by transformers on `reference`, pooled as its
    sentence-transformers configuration says, against the run's vector (cosine)."""
    from pathlib import Path

    import torch
    from transformers import AutoModel, AutoTokenizer

    pooling_file = Path(reference) / "1_Pooling" / "config.json"
    pooling = json.loads(pooling_file.read_text()) if pooling_file.exists() else {"pooling_mode_mean_tokens": True}
    tokenizer = AutoTokenizer.from_pretrained(reference)
    model = AutoModel.from_pretrained(reference, dtype=torch.float32).eval()
    limit_file = Path(reference) / "sentence_bert_config.json"
    limit = json.loads(limit_file.read_text()).get("max_seq_length") if limit_file.exists() else None
    results = []
    for sample in samples:
        encoded = tokenizer(sample["text"], truncation=True, max_length=limit or tokenizer.model_max_length,
                            return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state[0]
        if pooling.get("pooling_mode_cls_token"):
            vector = hidden[0]
        elif pooling.get("pooling_mode_lasttoken"):
            vector = hidden[-1]
        else:
            vector = hidden.mean(0)
        cosine = torch.nn.functional.cosine_similarity(vector, torch.tensor(sample["vector"]), dim=0).item()
        results.append(
            EmbeddingOutcome(custom_id=sample["custom_id"], cosine=round(cosine, 6), truncated=sample["cut"])
        )
    return results


def _not_a_text_model(reference: str) -> str | None:
    """Why transformers cannot score the run's text against `reference`, or None."""
    from transformers import AutoConfig

    if reference_class(reference) is not None:
        return None
    kind = AutoConfig.from_pretrained(reference).model_type
    return f"the reference ({kind}) is neither a causal LM nor an image-text-to-text model"


def _too_big_here(model: str, engine_here: bool) -> str | None:
    """Why the reference (and an engine for the re-run) cannot be loaded in this process: its
    weights take more than half the memory free here, and this process holds no engine already.
    None when they fit."""
    import psutil

    if engine_here:  # the run's own engine is here: the re-run costs nothing more
        return None
    weights = weight_bytes(model)
    free = psutil.virtual_memory().available
    if weights <= free / 2:
        return None
    return (
        f"the reference weights ({weights / 2**30:.1f} GiB) do not fit this host's free memory "
        f"({free / 2**30:.1f} GiB) beside an engine: give --oracle-model a smaller sibling, or fan out "
        "(the checks then run on the GPU pool)"
    )


def _rerun(samples: list[dict], job: JobSpec) -> dict:
    """The samples through the engine again, same parameters (seed included): custom_id → output."""
    from nightshift.engine.local import get_engine
    from nightshift.engine.tool_calls import ToolCalling
    from nightshift.wire.media import MediaPolicy
    from nightshift.wire.openai_format import ServedModels, prepare_request

    engine = get_engine(job.engine)
    prepared = [  # as the generate stage prepared them: forced tool calls through the same grammar
        prepare_request(
            i,
            s["custom_id"],
            {"url": s.get("url", "/v1/chat/completions"), "body": s["body"]},
            dataclasses.replace(ServedModels.of_job(job), mismatch="ignore"),
            engine.default_sampling_params,
            engine.max_model_len,
            engine.runner_type,
            engine.model_config,
            ToolCalling.for_engine(engine, job.tool_call_parser),
            MediaPolicy.of_job(job),
        )
        for i, s in enumerate(samples)
    ]
    return {samples[request.key]["custom_id"]: outcome for request, outcome in engine.generate(prepared)}


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id
