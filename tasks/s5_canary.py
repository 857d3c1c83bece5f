"""Canary stage: gate the run on evidence that its answers are right.

Three checks, each reported, the first and last two gating:

1. **Expectations** — the canary rows (which rode inside the real shards) must meet their
   expectations; at least `min_pass_rate` of them must pass.
2. **Oracle** — for `oracle_samples` greedy rows sampled from the run, the run's own first
   `oracle_tokens` tokens are scored teacher-forced by Hugging Face transformers on the
   reference weights (the job's, unless `oracle_model` names others): each must be among the
   reference's `oracle_top_k` and within `oracle_logprob_tolerance` nats of its best. A sample
   agrees when all its tokens do; the share that agrees must reach `oracle_min_agreement`.
   Exact greedy agreement would fail on numerical noise (bf16, batch-dependent kernels flip
   near-ties, and one flip changes every later token); this fails only on tokens the
   reference would not have produced.
3. **Determinism** — `determinism_samples` rows re-run through the engine with the same
   parameters (seed included) must give the same text.
4. **Embedding oracle** — in an embedding run, `oracle_samples` texts sampled from the run are
   embedded again with transformers on the reference weights, pooled as their
   sentence-transformers configuration says (mean, CLS or last token); each vector's cosine to
   the run's must reach `embedding_min_cosine`.

On failure the flow run fails with a message naming what failed, the outputs stay on disk,
`validation.json` says `"validated": false`, and `nightshift run` exits 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time

import orjson
from prefect import get_run_logger, task

from nightshift.adapters import local_adapter
from nightshift.canaries import CANARY_PREFIX, CanaryFailure, check_expectations, load_canaries
from nightshift.config import CanaryConfig, JobSpec
from nightshift.images import image_parts
from nightshift.models import local_model, weight_bytes
from nightshift.oracle import oracle_check, reference_class
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
from nightshift.rundir import RunDir
from nightshift.storage import duckdb_connection, local_copies, sql_path
from nightshift.workers import validation_verdict, worker_identity


def validate(run_dir: RunDir, job: JobSpec, config: CanaryConfig) -> Verdict:
    """The verdict on the merged run in `run_dir` (checks, failures, where they ran); the caller
    decides where it is written."""
    started = time.monotonic()
    checks: dict[str, tuple[Check, str | None]] = {}  # name → (the check, why it failed or None)
    if config.canaries:
        checks["canaries"] = _canaries_check(run_dir, config)
    samples, skipped = _greedy_samples(run_dir, job, config)
    if skipped:  # said, not attempted, and not a failure: an 8B model on a CPU orchestrator, no row to check
        for name, wanted in (("oracle", config.oracle_samples), ("determinism", config.determinism_samples)):
            if wanted:
                checks[name] = (SkippedCheck(skipped=skipped), None)
    again = _rerun_once(samples, job)
    if config.oracle_samples and samples:
        no_reference = _no_reference_here(job, config)
        checks["oracle"] = (SkippedCheck(skipped=no_reference), None) if no_reference else _oracle_check(
            _first_of_each_model(samples, config.oracle_samples), again, job, config
        )  # fmt: skip
    if embedded := _embedded_rows(run_dir, job, config.oracle_samples):
        checks["embedding_oracle"] = _embedding_check(embedded, job, config)
    if config.determinism_samples and samples:
        checks["determinism"] = _determinism_check(_first_of_each_model(samples, config.determinism_samples), again)
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
    "it samples greedy, unconstrained chat and completions rows with a text prompt (embeddings for the embedding "
    "oracle), and this run has none that succeeded: its rows are sampled, constrained, token-id prompts or failed"
)


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


def _greedy_samples(run_dir: RunDir, job: JobSpec, config: CanaryConfig) -> tuple[list[dict], str | None]:
    """The rows the oracle and determinism checks sample, or why they are skipped."""
    samples, chat_rows = _greedy_chat_rows(run_dir, job, max(config.oracle_samples, config.determinism_samples))
    skipped = None
    if samples:
        from nightshift.engine import current_engine  # vLLM: only where there are rows to re-run

        reference = local_model(config.reference(job))
        skipped = _not_a_text_model(reference) or _too_big_here(reference, current_engine() is not None)
    if chat_rows and not samples:
        skipped = f"none of the run's {chat_rows} chat and completions rows is greedy (temperature 0) and unconstrained"
    return ([], skipped) if skipped else (samples, None)


def _rerun_once(samples: list[dict], job: JobSpec) -> dict:
    """One re-run on the engine serves both checks: the determinism check compares its text, the
    oracle scores its token ids (the run's own tokens: re-tokenizing the text may split it
    otherwise). An engine loaded for it is shut down after: on a GPU, the reference needs its
    memory."""
    if not samples:
        return {}
    from nightshift.engine import current_engine, shutdown_engine  # vLLM: only where rows are re-run

    loaded_for_checks = current_engine() is None
    again = _rerun(samples, job)
    if loaded_for_checks:
        shutdown_engine()
    return again


def _oracle_check(
    samples: list[dict], again: dict, job: JobSpec, config: CanaryConfig
) -> tuple[OracleCheck, str | None]:
    """The run's tokens scored teacher-forced by transformers on the reference weights (with a
    row's adapter merged in)."""
    references = {name: config.reference_adapter(job, name) for name in {s["adapter"] for s in samples} if name}
    memory = _room_for_the_reference(local_model(config.reference(job)))
    scored = oracle_check(
        [{**s, "token_ids": _token_ids(again.get(s["custom_id"]), s["text"])} for s in samples],
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
    from nightshift.engine import current_engine

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
    from nightshift.engine import current_engine, shutdown_engine

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
        DeterminismOutcome(custom_id=s["custom_id"], same=_text(again.get(s["custom_id"])) == s["text"])
        for s in samples
    ]
    check = DeterminismCheck(same=sum(r.same for r in rerun), of=len(rerun), results=rerun)
    if all(r.same for r in rerun):
        return check, None
    return check, "re-running with the same seed changed the output of " + ", ".join(
        r.custom_id for r in rerun if not r.same
    )


@task(name="canary-validation")
def canary_validation(run_dir: str, job: JobSpec, config: CanaryConfig, validated_by: str | None = None) -> Verdict:
    """Gate the flow run on the verdict: validate here, or read the verdict that the flow run
    `validated_by` (the checks run on the GPU pool, where the engine is) left in the run directory."""
    from prefect.artifacts import create_markdown_artifact

    verdict = validated_verdict(run_dir, validated_by) if validated_by else validate(RunDir(run_dir), job, config)
    verdict.save(RunDir(run_dir).validation)
    lines = [f"# Canary validation: {verdict.said()}", ""]
    lines += [f"- {failure}" for failure in verdict.failures]
    lines += [f"- {name}: {json.dumps(summary)}" for name, summary in verdict.summaries().items()]
    create_markdown_artifact(markdown="\n".join(lines), description="Nightshift canary validation")
    checks = "; ".join(
        f"{name} {json.dumps(summary)}" for name, summary in verdict.summaries(("results", "reference")).items()
    )
    get_run_logger().info(
        "validation %s (%s)%s",
        verdict.said(),
        checks,
        "".join(f"\n  - {failure}" for failure in verdict.failures),
    )
    if verdict.verdict == "not_validated":
        from nightshift import events

        events.emit(events.VALIDATION_SKIPPED, run_dir, job, reasons=verdict.skipped_reasons)
    if verdict.verdict == "failed":
        raise CanaryFailure(
            "validation failed — outputs are on disk but NOT validated: " + " | ".join(verdict.failures)
        )
    return verdict


def validated_verdict(run_dir: str, flow_run_id: str) -> Verdict:
    """The verdict the validation run `flow_run_id` left under its own name: another run's — an
    earlier night's, or a duplicate's that was taken for lost and finished after all — is not it."""
    path = validation_verdict(run_dir, flow_run_id)
    try:
        return Verdict.load(path)
    except FileNotFoundError:
        raise RuntimeError(f"the validation run {flow_run_id} left no verdict at {path}") from None


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


# Body fields under which the engine's tokens are not the model's own most likely ones (an
# end-of-sequence suppressed, a bias, a grammar): the reference would rightly rank them lower.
CONSTRAINED = (
    "response_format", "ignore_eos", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools",
)  # fmt: skip


def _greedy_chat_rows(run_dir: RunDir, job: JobSpec, count: int) -> tuple[list[dict], int]:
    """Up to `count` succeeded greedy, unconstrained chat and completions rows of the run, sampled
    reproducibly, and how many succeeded such rows there were to choose from."""
    if count <= 0:
        return [], 0
    samples: dict[str | None, _Sample] = {}  # per model: the base's rows and each adapter's, sampled apart
    chat_rows, adapters = 0, job.adapter_names()
    rows = _generated_rows(
        run_dir, job, "c.custom_id, c.text, s.request", "c.finish_reason IS NOT NULL AND c.text IS NOT NULL"
    )
    for custom_id, text, request in rows:
        row = orjson.loads(request)
        body, chat = row["body"], "messages" in row["body"]
        generated = chat or isinstance(body.get("prompt"), str)  # a completion's prompt as text: scored as given
        chat_rows += generated
        if (
            generated
            and body.get("temperature") == 0
            and body.get("n", 1) == 1
            and not any(body.get(constraint) for constraint in CONSTRAINED)
            and not (chat and image_parts(body["messages"]))  # the oracle's reference reads text only
        ):
            adapter = body.get("model") if body.get("model") in adapters else None
            sample = samples.setdefault(adapter, _Sample(count))
            if (slot := sample.slot()) is not None:
                sample.items[slot] = {"custom_id": custom_id, "text": text, "body": body, "adapter": adapter,
                                      "url": row.get("url", "/v1/chat/completions")}  # fmt: skip
    chosen = [samples[model].chosen() for model in sorted(samples, key=lambda name: name or "")]
    return [item for items in chosen for item in items], chat_rows


def _first_of_each_model(samples: list[dict], count: int) -> list[dict]:
    """The first `count` samples of the base model and of each adapter."""
    taken: dict[str | None, int] = {}
    kept = []
    for sample in samples:
        if taken.get(sample["adapter"], 0) < count:
            taken[sample["adapter"]] = taken.get(sample["adapter"], 0) + 1
            kept.append(sample)
    return kept


def _embedded_rows(run_dir: RunDir, job: JobSpec, count: int) -> list[dict]:
    """Up to `count` embedded text rows of the run (vector and the text embedded), sampled
    reproducibly; none for a run that embedded nothing."""
    if count <= 0:
        return []
    sample = _Sample(count)
    rows = _generated_rows(
        run_dir,
        job,
        "c.custom_id, s.request, c.finish_reason, c.embedding",
        "c.embedding IS NOT NULL AND c.source = 'engine'",
        lazy="embedding",
    )
    for custom_id, request, finish_reason, vector in rows:
        text = orjson.loads(request)["body"].get("input")
        text = text[0] if isinstance(text, list) and text and isinstance(text[0], str) else text
        if isinstance(text, str) and (slot := sample.slot()) is not None:
            cut = finish_reason == "length"
            sample.items[slot] = {"custom_id": custom_id, "vector": vector.as_py(), "text": text, "cut": cut}
    return sample.chosen()


def _generated_rows(run_dir: RunDir, job: JobSpec, columns: str, where: str, lazy: str | None = None):
    """The run's succeeded rows (`c`, their best outcome) beside their planned requests (`s`),
    shard by shard in input order, as tuples of `columns`: a run of millions of rows is read as
    a stream, and costs validation no more memory than one of thousands. Canary rows are not
    the run's own and are left out."""
    from nightshift.chunks import best_rows_sql, chunk_files, shard_cache_key
    from nightshift.records import Plan

    with duckdb_connection() as con:
        for shard in Plan.load(run_dir.plan_manifest).shards:
            files = chunk_files(run_dir.shard_output(shard_cache_key(shard, job)))
            if not files:
                continue
            with local_copies([*files, shard.path]) as (*files, requests):
                rows = con.sql(
                    f"""
                    SELECT {columns}
                    FROM ({best_rows_sql(files)}) c JOIN read_parquet('{sql_path(requests)}') s USING (row_index)
                    WHERE c.ok AND s.request IS NOT NULL AND NOT starts_with(c.custom_id, '{CANARY_PREFIX}') AND {where}
                    ORDER BY c.row_index
                    """
                )
                yield from _tuples(rows, lazy)


class _Sample:
    """A reproducible uniform sample of `size` items from a stream of unknown length (reservoir
    sampling): only the sample is held, and an item need only be built once it is chosen."""

    def __init__(self, size: int) -> None:
        self.size, self.seen, self.items = size, 0, []
        self._random = random.Random(0)

    def slot(self) -> int | None:
        """Where the stream's next item goes in `items`, or None: it is not chosen."""
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(None)
            return len(self.items) - 1
        slot = self._random.randrange(self.seen)
        return slot if slot < self.size else None

    def chosen(self) -> list:
        """The sample in random order (a prefix of it is a sample too, not the run's first rows)."""
        self._random.shuffle(self.items)
        return self.items


def _tuples(relation, lazy: str | None = None):
    """A query's rows as tuples, 8,192 at a time; the column named `lazy` stays an Arrow scalar
    (`.as_py()` it when needed: a vector per row would be millions of Python floats)."""
    for batch in relation.to_arrow_reader(8192):
        names = batch.schema.names
        columns = [batch.column(name) if name == lazy else batch.column(name).to_pylist() for name in names]
        yield from zip(*columns)


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
    from nightshift.engine import get_engine
    from nightshift.media import MediaPolicy
    from nightshift.openai_format import ServedModels, prepare_request

    engine = get_engine(job.engine)
    prepared = [
        prepare_request(
            i,
            s["custom_id"],
            {"url": s.get("url", "/v1/chat/completions"), "body": s["body"]},
            dataclasses.replace(ServedModels.of_job(job), mismatch="ignore"),
            engine.default_sampling_params,
            media=MediaPolicy.of_job(job),
        )
        for i, s in enumerate(samples)
    ]
    return {samples[request.key]["custom_id"]: outcome for request, outcome in engine.generate(prepared)}


def _text(outcome) -> str | None:
    return None if outcome is None or isinstance(outcome, Exception) else outcome.outputs[0].text


def _token_ids(outcome, text: str) -> list[int] | None:
    """The re-run's token ids, if it said what the run said; else None (the text is re-tokenized)."""
    token_ids = outcome.outputs[0].token_ids  # None from an engine server
    return list(token_ids) if token_ids is not None and _text(outcome) == text else None
