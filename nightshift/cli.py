"""`nightshift` — run an LLM over a corpus or an OpenAI batch file, offline, with Prefect.

    nightshift run INPUT --output RUN_DIR [--model tiny|smollm2|PATH] [--shard-size N] ...
    nightshift serve             OpenAI's Batch API (/v1/files, /v1/batches), each batch a run
    nightshift models            provision the bundled models into the local cache
    nightshift demo              summarize a sample corpus with SmolLM2 on this machine

`run` exits 0 only when every input row is in output.jsonl or errors.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nightshift.errors import ExitStatus, Preempted
from nightshift.flows.run import run_job

# Models come from the local cache only; set before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A temporary Prefect server would otherwise log an ERROR for telemetry it cannot send offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# A run with no PREFECT_API_URL starts a temporary Prefect server, which Prefect gives 20 s: on a
# busy machine (an engine loading, other runs starting) it needs longer. Prefect reads it lazily.
EPHEMERAL_START_S = 180
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_START_S))
_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"

DEMO_TEMPLATE = "Summarize this document in one sentence.\n\n{text}"
DEMO_SYSTEM = "You are a concise assistant that writes accurate one-sentence summaries."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nightshift", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_and_plan(commands)
    _add_run_directory_commands(commands)
    _add_operator_commands(commands)
    return _command(parser.parse_args(argv))


def _add_run_and_plan(commands) -> None:
    run = commands.add_parser("run", help="run a batch job")
    run.add_argument("input", help="OpenAI batch JSONL, or a corpus (.parquet, .csv, .jsonl with --text-column)")
    run.add_argument("--output", required=True, help="run directory (re-running it resumes)")
    run.add_argument(
        "--deadline",
        help="finish by: a duration (6h, 90m), a time of day (08:00) or an ISO date-time; unfinished rows "
        "then end as batch_expired errors (exit status 4)",
    )
    _add_job_arguments(run)
    run.add_argument(
        "--verbose",
        action="store_true",
        help="the engine's own log lines (vLLM's INFO), third-party warnings and progress bars too",
    )

    plan = commands.add_parser(
        "plan", help="dry run: tokens, hours, GPUs to finish by a deadline, cost (no engine, no GPU)"
    )
    plan.add_argument("input", help="the input `run` would take")
    plan.add_argument("--deadline", help="finish by: a duration (6h), a time of day (08:00) or an ISO date-time")
    plan.add_argument("--pricing", help="a saved GpuPricing block's name (default: the block's defaults)")
    plan.add_argument("--history", help="a directory of earlier run directories: their measured throughput")
    plan.add_argument(
        "--calibrate", type=int, metavar="N", help="without history: run N rows of the input to measure throughput"
    )
    plan.add_argument("--format", choices=["table", "json"], default="table")
    _add_job_arguments(plan)

    demo = commands.add_parser("demo", help="summarize a sample corpus with SmolLM2")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--documents", type=int, default=200)
    demo.add_argument("--model", default="smollm2")


def _add_run_directory_commands(commands) -> None:
    status = commands.add_parser("status", help="shards done / partial / pending of a run, and an ETA")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    report = commands.add_parser("report", help="cost and throughput report of a run (or --all runs under a root)")
    report.add_argument("run_dir", help="a run directory, or with --all a directory of runs")
    report.add_argument("--format", choices=["md", "json"], default="md")
    report.add_argument("--all", action="store_true", help="the trend over every run under RUN_DIR")

    retry = commands.add_parser("retry", help="re-run the rows that failed for the engine's sake (engine_error)")
    retry.add_argument("run_dir")


def _add_operator_commands(commands) -> None:
    models = commands.add_parser("models", help="provision the bundled models (idempotent)")
    models.add_argument("names", nargs="*", help="tiny, smollm2, minilm (default: all)")

    serve = commands.add_parser("serve", help="serve OpenAI's Batch API (/v1/files, /v1/batches) here")
    from nightshift.config import BatchApiConfig

    _add_fields(serve, BatchApiConfig)

    automations = commands.add_parser(
        "automations", help="create deployments/automations.yaml's Automations on the Prefect server"
    )
    automations.add_argument("action", choices=["apply"])
    automations.add_argument(
        "--notify",
        metavar="TYPE/NAME",
        help="notification block for failed validations and runs, e.g. slack-webhook/oncall",
    )
    automations.add_argument(
        "--zombie-after-s", type=int, default=600, help="heartbeat silence after which a flow run is marked Crashed"
    )

    pool = commands.add_parser("work-pool", help="work-pool recipes: a Kubernetes GPU base job template")
    pool.add_argument("action", choices=["template"])
    pool.add_argument("--gpus", type=int, default=1, help="GPUs per pod (the model block's tensor_parallel_size)")
    pool.add_argument("--spot", choices=["gke", "eks", "karpenter", "aks"], help="onto this cloud's spot nodes")


def _command(args) -> int:
    # The run's story is in Prefect's log lines; the engine's own (every process's INFO, its
    # shutdown warnings) and third parties' warnings and bars only with --verbose.
    from nightshift.observe.logs import expected_failures_in_one_line, quiet_third_parties, set_vllm_log_level

    verbose = getattr(args, "verbose", False)
    set_vllm_log_level("INFO" if verbose else os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"))
    if not verbose:
        quiet_third_parties()
        if args.command in ("run", "retry", "demo"):
            expected_failures_in_one_line()
    # `run` finds or starts it while its engine loads (flows/run.py), the others before their flow
    if args.command in ("retry", "demo") and (status := _shared_prefect_server()) is not None:
        return status
    if args.command == "serve":
        return _serve(args)
    if args.command == "models":
        return _models(args.names)
    if args.command == "plan":
        return _answer_bad_input(lambda: _plan(args))
    if args.command == "demo":
        return _demo(args)
    if args.command == "report":
        return _report(args)
    if args.command == "retry":
        from nightshift.flows.retry import retry_errors

        report = _run_preemptible(args.run_dir, lambda: retry_errors(args.run_dir))
        _print_report(report)
        return ExitStatus.COMPLETE if report.complete else ExitStatus.INCOMPLETE
    if args.command == "automations":
        return _automations(args)
    if args.command == "work-pool":
        import json

        from nightshift.fleet.work_pools import kubernetes_job_template

        print(json.dumps(kubernetes_job_template(args.gpus, args.spot), indent=2))
        return ExitStatus.COMPLETE
    if args.command == "status":
        from nightshift.observe.status import print_status
        from nightshift.runtime.rundir import RunDir

        return print_status(RunDir(args.run_dir), as_json=args.json)
    return _run(args)


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Options from the typed configuration (nightshift/config.py): its names, types, choices,
    defaults and descriptions; an option not given leaves the configuration's default."""
    from nightshift.config import DEFAULT_SHARD_SIZE, CanaryConfig, CorpusOptions, EngineSettings, JobOptions
    from nightshift.models import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=None,
        help=f"tiny, smollm2, minilm, a model directory or an s3:// URL "
        f"[default: {DEFAULT_MODEL}; minilm with --task embed]",
    )
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per shard (checkpoint unit)")
    _add_fields(parser.add_argument_group("job"), JobOptions)
    _add_fields(parser.add_argument_group("engine (vLLM)"), EngineSettings)
    _add_fields(
        parser.add_argument_group("validation (canary stage)"),
        CanaryConfig,
        rename={"min_pass_rate": "canary_min_pass_rate"},
    )
    _add_fields(parser.add_argument_group("corpus inputs (Parquet, CSV, JSONL records)"), CorpusOptions)


def _add_fields(group, model, rename: dict[str, str] | None = None) -> None:
    import types
    import typing

    for name, field in model.model_fields.items():
        annotation = field.annotation
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        kind = next(k for k in typing.get_args(annotation) if k is not type(None)) if union else annotation
        choices = list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        text = field.description + (f" [default: {default}]" if default is not None else "")
        flag = "--" + (rename or {}).get(name, name).replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) in (tuple, list, dict):  # repeatable: each given once more (dict: KEY=VALUE)
            group.add_argument(flag, dest=name, action="append", default=None, help=field.description)
        else:
            group.add_argument(flag, dest=name, type=str if choices else kind, choices=choices, default=None, help=text)


def _given(args, model) -> dict:
    """The options of `model` given on the command line."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}


def _corpus_options(args):
    from nightshift.config import CorpusOptions
    from nightshift.inputs import detect_kind

    given = _given(args, CorpusOptions)
    explicit = bool({"text_column", "id_column", "task"} & set(given))
    if not explicit and detect_kind(args.input, None) != "corpus":
        return None
    return CorpusOptions(**given)


def _validation(args):
    from nightshift.config import CanaryConfig
    from nightshift.models import resolve_model

    given = _given(args, CanaryConfig)
    if "oracle_model" in given:
        given["oracle_model"] = resolve_model(given["oracle_model"])
    return CanaryConfig(**given)


def _answer_bad_input(command) -> int:
    """Run `command()`; a bad input or configuration is one line on stderr and exit status 2."""
    from pydantic import ValidationError

    from nightshift.errors import ConfigurationError
    from nightshift.inputs import InputError
    from nightshift.jobs import validation_message

    try:
        return command()
    except (InputError, FileNotFoundError, ConfigurationError) as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
    except ValidationError as exc:
        print(f"nightshift: {validation_message(exc)}", file=sys.stderr)
    return ExitStatus.CONFIGURATION


def _job(args, corpus):
    from nightshift.config import EngineSettings, JobOptions
    from nightshift.jobs import make_job
    from nightshift.models import DEFAULT_MODEL

    model = args.model or ("minilm" if corpus is not None and corpus.task == "embed" else DEFAULT_MODEL)
    return make_job(model, **_given(args, EngineSettings), **_given(args, JobOptions))


def _automations(args) -> int:
    from nightshift.fleet.automations import AutomationsError, apply, notification_block_id, shipped_automations

    try:
        block_id = notification_block_id(args.notify) if args.notify else None
        applied = apply(shipped_automations(block_id, args.zombie_after_s))
    except AutomationsError as exc:
        print(f"nightshift automations: {exc}", file=sys.stderr)
        return ExitStatus.CONFIGURATION
    print("automations applied: " + ", ".join(applied))
    if not args.notify:
        print("(no --notify block: the notifications on failed validations and runs were not made)")
    return ExitStatus.COMPLETE


def _run(args) -> int:
    from nightshift.errors import EngineStartStalled, EngineUnreachable
    from nightshift.runtime.deadline import parse_deadline
    from nightshift.runtime.progress import ConsoleProgress
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.canaries import CanaryFailure

    def start() -> int:
        corpus, validation = _corpus_options(args), _validation(args)
        job = _job(args, corpus)
        # A duration counts from now, not from when Prefect gets to the flow.
        deadline = parse_deadline(args.deadline).isoformat() if args.deadline else None
        with ConsoleProgress():
            report = _run_preemptible(
                args.output,
                lambda: run_job(args.input, args.output, job, args.shard_size, corpus, validation, deadline),
            )
        _print_report(report)
        if report.expired:
            return ExitStatus.EXPIRED
        return ExitStatus.COMPLETE if report.complete else ExitStatus.INCOMPLETE

    try:
        return _answer_bad_input(start)
    except CanaryFailure as exc:
        print(f"nightshift: {exc}\nnightshift: see {RunDir(args.output).validation}", file=sys.stderr)
        return exc.exit_status
    except EngineStartStalled as exc:
        _exit_leaving_the_stalled_start(str(exc))
    except EngineUnreachable as exc:  # every finished row is on disk: running again resumes
        print(f"nightshift: {exc}", file=sys.stderr)
        return exc.exit_status
    except Exception as exc:
        from nightshift.runtime.storage import StorageFull, is_device_full

        if (unreachable := _prefect_unreachable(exc)) is not None:
            print(f"nightshift: {unreachable}", file=sys.stderr)
            return unreachable.exit_status
        if not is_device_full(exc):
            raise
        told = exc if isinstance(exc, StorageFull) else StorageFull(Path(args.output), 0)
        print(f"nightshift: {told}", file=sys.stderr)
        return ExitStatus.STORAGE_FULL


def _shared_prefect_server() -> int | None:
    """With no Prefect server configured, the machine's shared temporary one (started by the first
    run that needs it; nightshift/runtime/local_prefect.py); the exit status where it does not answer."""
    from nightshift.errors import PrefectUnreachable
    from nightshift.runtime.local_prefect import use_shared_server

    try:
        use_shared_server()
    except PrefectUnreachable as exc:
        print(f"nightshift: {exc}", file=sys.stderr)
        return exc.exit_status
    return None


def _prefect_unreachable(exc: BaseException):
    """Prefect's own error for a temporary server that did not start in time (its whole stdout
    and stderr in the message), as one line that says what to do; None for any other error."""
    from nightshift.errors import PrefectUnreachable

    if isinstance(exc, PrefectUnreachable):  # the machine's shared temporary server (nightshift.runtime.local_prefect)
        return exc
    while exc is not None and _EPHEMERAL_TIMEOUT not in str(exc):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return None
    return PrefectUnreachable.not_started(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20"))


def _exit_leaving_the_stalled_start(message: str) -> None:
    """Exit 75 now, without the interpreter's teardown: the stalled start's thread may hold a
    lock that teardown needs. The run's failure is already on the Prefect server; its last log
    lines (the stacks) are flushed first, for as long as that takes up to 10 s."""
    import threading

    import psutil

    print(f"nightshift: {message}", file=sys.stderr)
    prefect_handlers = sys.modules.get("prefect.logging.handlers")
    if prefect_handlers is not None:
        flusher = threading.Thread(target=prefect_handlers.APILogHandler.flush, daemon=True)
        flusher.start()
        flusher.join(10)
    for child in psutil.Process().children(recursive=True):  # the engine's processes, if any started
        child.kill()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(ExitStatus.TEMPORARY)


def _plan(args) -> int:
    """`nightshift plan`: the input planned as a run would, then nightshift/stages/estimate.py's dry
    run over it. Loads no engine unless asked to calibrate; needs no Prefect server."""
    import json
    import tempfile

    from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
    from nightshift.inputs import check_input, detect_kind
    from nightshift.jobs import check_model_files
    from nightshift.runtime.deadline import parse_deadline
    from nightshift.runtime.rundir import RunDir
    from nightshift.stages.estimate import estimate_input, render
    from nightshift.stages.plan import plan

    corpus = _corpus_options(args)
    job = _job(args, corpus)
    check_model_files(job.engine.model)  # its tokenizer counts the tokens: a model that cannot load is said now
    deadline = parse_deadline(args.deadline) if args.deadline else None
    check_input(args.input, detect_kind(args.input, corpus), corpus)
    pricing = GpuPricing.load(args.pricing) if args.pricing else GpuPricing()
    with tempfile.TemporaryDirectory(prefix="nightshift-plan-") as scratch:
        planned = plan(args.input, RunDir(scratch), args.shard_size, corpus, group_prefixes=job.regroup_shards)
        calibrate = (
            (lambda: _calibrate(planned, job, args.calibrate, Path(scratch), pricing)) if args.calibrate else None
        )
        result = estimate_input(planned, job, pricing, ManagedApiPrices(), deadline, args.history, calibrate)
    print(json.dumps(result.model_dump(), indent=2) if args.format == "json" else render(result))
    return ExitStatus.COMPLETE


def _calibrate(planned, job, rows: int, scratch: Path, pricing):
    """Throughput measured on the first `rows` valid rows of the plan: a real run, stated as such."""
    import json

    from nightshift.config import CanaryConfig
    from nightshift.records import CostReport
    from nightshift.runtime.rundir import RunDir
    from nightshift.runtime.storage import read_table
    from nightshift.stages.estimate import Throughput

    sample, taken = scratch / "calibration.jsonl", 0
    with open(sample, "w", encoding="utf-8") as out:
        for shard in planned.shards:
            table = read_table(shard.path, columns=["custom_id", "request", "error"]).to_pylist()
            for row in table:
                if row["error"] is None and taken < rows:
                    request = json.loads(row["request"])
                    out.write(json.dumps({"custom_id": row["custom_id"], "method": "POST", **request}) + "\n")
                    taken += 1
    unchecked = CanaryConfig(oracle_samples=0, determinism_samples=0)
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # the run's chatter (and its engine processes') goes to stderr: stdout is the plan's
    try:
        run_job(str(sample), str(scratch / "calibration"), job, validation=unchecked)
        from nightshift.engine.local import shutdown_engine

        shutdown_engine()  # now, while its goodbyes still go to stderr
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    report = CostReport.load(RunDir(scratch / "calibration").report_json)
    if not report.tokens_per_second_per_engine:
        return None
    return Throughput(
        tokens_per_second=report.tokens_per_second_per_engine,
        source=f"calibration: {taken} rows of this input, run just now on {report.accelerator}",
        completion_per_row=report.completion_per_row,
    )


def _serve(args) -> int:
    from nightshift.batch_api.server import serve
    from nightshift.config import BatchApiConfig

    return _answer_bad_input(lambda: serve(BatchApiConfig(**_given(args, BatchApiConfig))))


def _run_preemptible(run_dir: str, start):
    """Run `start()`; on SIGTERM, let generation flush its finished rows and exit 143."""
    from nightshift.runtime import preemption

    preemption.install_sigterm_handler()
    try:
        return start()
    except BaseException as exc:  # Prefect turns SIGTERM into TerminationSignal in the main thread
        prefect_exceptions = sys.modules.get("prefect.exceptions")  # not imported: not Prefect's signal
        terminated = prefect_exceptions is not None and isinstance(exc, prefect_exceptions.TerminationSignal)
        if not (terminated or isinstance(exc, Preempted)) and not preemption.stop_requested.is_set():
            raise
    preemption.stop_requested.set()
    flushed = preemption.wait_until_flushed(preemption.grace_seconds() + 10)
    print(
        f"nightshift: stopped on SIGTERM ({'finished rows saved' if flushed else 'flush timed out'}); "
        f"re-run the same command to resume {run_dir}",
        file=sys.stderr,
    )
    sys.stderr.flush()
    import psutil

    _settle_writes(timeout=10)  # the grace period is spent: a spot VM's notice is short
    for child in psutil.Process().children(recursive=True):  # engine core and its workers
        child.kill()
    os._exit(ExitStatus.PREEMPTED)


def _print_report(report) -> None:
    print(
        f"\n{report.total_rows} rows: {report.succeeded} succeeded, {report.failed} failed"
        f" ({report.prompt_tokens} prompt + {report.completion_tokens} completion tokens)"
    )
    print(f"shards: {report.shards} ({report.shards_cached} from checkpoints)")
    if report.expired:
        print(
            f"deadline reached: {report.errors_by_code.get('batch_expired', 0)} rows not generated (batch_expired); "
            f"`nightshift retry {report.run_dir}` generates them"
        )
    if report.errors_by_code:
        print("errors by code: " + ", ".join(f"{c}={n}" for c, n in report.errors_by_code.items()))
    if report.embeddings_path:  # an embedded corpus: its outputs are the vectors, output.jsonl is empty
        print(f"vectors: {report.embeddings_path}")
    else:
        print(f"outputs: {report.output_path}")
    print(f"errors:  {report.errors_path}\nresults: {report.results_path}")


def _report(args) -> int:
    from nightshift.blocks.pricing import GpuPricing, ManagedApiPrices
    from nightshift.report import trend, write_report
    from nightshift.runtime.rundir import RunDir

    if args.all:
        rows = trend(args.run_dir)
        if args.format == "json":
            print(json.dumps(rows, indent=2, default=str))
        else:
            print("| run | rows | tokens/s | $/1M tokens | $/1M spot | GPU util % |\n|---|---|---|---|---|---|")
            for r in rows:
                print(
                    f"| {Path(r['run_dir']).name} | {r['rows']} | {r['tokens_per_second']} | "
                    f"{r['cost_per_million_tokens']} | {r['cost_per_million_tokens_spot']} | "
                    f"{r['gpu_utilization_mean']} |"
                )
        return ExitStatus.COMPLETE
    run_dir = RunDir(args.run_dir)
    if not run_dir.plan_manifest.exists() or not run_dir.job.exists():
        print(f"nightshift: {args.run_dir} is not a run directory (no plan/manifest.json or job.json)", file=sys.stderr)
        return ExitStatus.CONFIGURATION
    report = write_report(run_dir, GpuPricing(), ManagedApiPrices())
    print(json.dumps(report.figures(), indent=2) if args.format == "json" else run_dir.report_markdown.read_text())
    return ExitStatus.COMPLETE


def _models(names: list[str]) -> int:
    from nightshift.models import KNOWN_MODELS, provision

    unknown = set(names) - set(KNOWN_MODELS)
    if unknown:
        print(f"nightshift: unknown model(s) {sorted(unknown)}; known: {KNOWN_MODELS}", file=sys.stderr)
        return ExitStatus.CONFIGURATION
    for name, path in provision(tuple(names) or KNOWN_MODELS).items():
        print(f"{name}: {path}")
    return ExitStatus.COMPLETE


def _demo(args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nightshift.config import CorpusOptions
    from nightshift.jobs import make_job
    from nightshift.models import provision
    from nightshift.records import Verdict
    from nightshift.runtime.rundir import RunDir
    from nightshift.samples import sample_documents

    if args.model in ("tiny", "smollm2"):
        provision((args.model,))
    run_dir = Path(args.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = run_dir / "corpus.parquet"
    docs = sample_documents(args.documents)
    pq.write_table(pa.Table.from_pylist(docs), corpus_path)
    options = CorpusOptions(
        id_column="id", text_column="text", template=DEMO_TEMPLATE, system=DEMO_SYSTEM, max_tokens=64, temperature=0.0
    )
    from nightshift.config import CanaryConfig
    from nightshift.runtime.progress import ConsoleProgress

    canaries = Path(__file__).resolve().parent.parent / "deployments" / "canaries" / "demo.jsonl"
    with ConsoleProgress():  # 200 summaries take minutes on a CPU: show them moving
        report = run_job(
            str(corpus_path), str(run_dir), make_job(args.model), None, options, CanaryConfig(canaries=str(canaries))
        )
    _print_report(report)
    texts = {d["id"]: d["text"] for d in docs}
    verdict_path = RunDir(run_dir).validation
    validation = Verdict.load(verdict_path)
    print(f"validation: {validation.said()} ({', '.join(validation.checks)}; details in {verdict_path})")
    print("\nSample summaries:")
    with open(report.output_path) as lines:
        for _, line in zip(range(4), lines):
            row = json.loads(line)
            print(
                f"\n[{row['custom_id']}] {texts[row['custom_id']]}\n"
                f"  → {row['response']['body']['choices'][0]['message']['content']}"
            )
    if not report.complete:
        return ExitStatus.INCOMPLETE
    return _demo_embeddings(corpus_path, run_dir / "embeddings", texts)


def _demo_embeddings(corpus_path: Path, run_dir: Path, texts: dict[str, str]) -> int:
    """The same documents embedded with MiniLM, and the nearest neighbours of one, by DuckDB
    straight over embeddings.parquet: what vectors are for."""
    import duckdb

    from nightshift.config import CorpusOptions
    from nightshift.jobs import make_job
    from nightshift.models import provision
    from nightshift.runtime.storage import sql_path

    print("\nEmbedding the same documents with all-MiniLM-L6-v2 ...")
    provision(("minilm",))
    options = CorpusOptions(id_column="id", text_column="text", task="embed")
    report = run_job(str(corpus_path), str(run_dir), make_job("minilm"), None, options)
    _print_report(report)
    first = next(iter(texts))
    vectors = sql_path(report.embeddings_path)
    with duckdb.connect() as con:
        dimension = con.sql(f"SELECT len(embedding) FROM '{vectors}' LIMIT 1").fetchall()[0][0]
        nearest = con.sql(
            f"""SELECT b.id, array_cosine_similarity(a.embedding::FLOAT[{dimension}], b.embedding::FLOAT[{dimension}])
                FROM '{vectors}' a, '{vectors}' b WHERE a.id = ? AND b.id <> a.id ORDER BY 2 DESC LIMIT 3""",
            params=[first],
        ).fetchall()
    print(f"\nNearest neighbours of [{first}] {texts[first]}")
    for neighbour, cosine in nearest:
        print(f"  {cosine:.3f}  [{neighbour}] {texts[neighbour]}")
    return ExitStatus.COMPLETE if report.complete else ExitStatus.INCOMPLETE


def entry() -> None:
    """The `nightshift` command: `main()`, then an exit without the interpreter's teardown.

    By the time the process exits every output is written whole, the engine's processes are
    killed and Prefect's exit handlers (its temporary server's stop, its log flush) have run;
    what is left is Python freeing vLLM's, torch's and Prefect's module graph, which took
    3.4 s of a 1,000-row job's 52 s here (docs/benchmarks.md). `main()` called in-process
    (the tests) keeps the ordinary exit, and the process's engine for the next run."""
    import atexit

    finished: dict[str, int] = {}
    atexit.register(_exit_now, finished)  # registered first, so it runs after every other handler
    try:
        finished["code"] = main()
    finally:  # outputs are on disk (or the run failed): the engine's processes are killed at once
        _settle_writes()
        if "nightshift.engine.local" in sys.modules:
            from nightshift.engine.local import abandon_engine

            abandon_engine()
    sys.exit(finished["code"])


def _settle_writes(timeout: float = 60) -> None:
    """Let another thread's write that is past its fence check finish its second check (a run
    that lost its lease takes back what it made visible) before os._exit cuts it off."""
    if "nightshift.runtime.storage" in sys.modules:
        from nightshift.runtime.storage import settle_commits

        if not settle_commits(timeout=timeout):
            print(f"nightshift: a write was still in flight after {timeout:.0f} s; exiting without it", file=sys.stderr)


def _exit_now(finished: dict[str, int]) -> None:
    if "code" not in finished:  # main() raised: the ordinary exit, traceback and all
        return
    if "logging" in sys.modules:  # its own exit handler may have been registered after this one
        import logging

        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`): nothing left to lose
            pass
    os._exit(finished["code"])


if __name__ == "__main__":
    entry()
