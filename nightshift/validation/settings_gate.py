"""The gate on throughput settings: did the settings that make the run fast change its answers?

vLLM is not batch-invariant (a near-tie greedy token can flip with the batch's composition), and
FP8 KV caches, tensor parallelism or speculative decoding change numerics more. The gate takes
greedy rows of the run and scores the run's own tokens teacher-forced — one forward pass each,
the prompt and the run's first tokens as one prompt, vLLM's prompt log-probabilities read back —
on an engine under a contrasting setting: by default the run's own engine, one row at a time
(the run packed up to max_num_seqs rows per step); or an engine started with the operator's
setting (`--settings-gate kv_cache_dtype=auto`). Each token must be among the contrast's top k
and within the oracle's tolerance of its best, as the oracle asks of transformers' reference.
"""

from __future__ import annotations

import time

from nightshift.config import CanaryConfig, JobSpec
from nightshift.records import SettingsGateCheck, SettingsGateOutcome


def settings_gate(
    samples: list[dict], again: dict, job: JobSpec, config: CanaryConfig
) -> tuple[SettingsGateCheck, str | None]:
    """The gate's check on `samples` (greedy rows), whose re-run outputs `again` (custom_id →
    RequestOutput of the in-process engine) give their prompts' and answers' token ids."""
    from nightshift.engine.local import get_engine

    started = time.monotonic()
    engine = get_engine(job.engine)
    samples = [sample for sample in samples if _ids_of(again.get(sample["custom_id"]))]  # a row that failed: none
    scored = [(sample, *_token_ids(engine, sample, again[sample["custom_id"]], config)) for sample in samples]
    contrast = config.settings_gate_values
    if contrast:  # another engine, with the setting: the run's is shut down (one engine at a time)
        engine = get_engine(job.engine.contrasting(contrast))
        outputs = _scores(engine, scored, config.oracle_top_k, together=True)
        described = ", ".join(config.settings_gate)
    else:
        outputs = _scores(engine, scored, config.oracle_top_k, together=False)
        described = f"one row per step (the run: up to {engine.max_num_seqs} rows per step)"
    results = [_outcome(sample["custom_id"], output, config) for (sample, *_), output in zip(scored, outputs)]
    agreement = sum(r.agrees for r in results) / len(results)
    check = SettingsGateCheck(
        contrast=described,
        agreement=agreement,
        min_agreement=config.oracle_min_agreement,
        tokens=config.oracle_tokens,
        top_k=config.oracle_top_k,
        logprob_tolerance=config.oracle_logprob_tolerance,
        seconds=round(time.monotonic() - started, 2),
        results=results,
    )
    if agreement >= config.oracle_min_agreement:
        return check, None
    differ = ", ".join(r.custom_id for r in results if not r.agrees)
    return check, (
        f"settings gate: agreement {agreement:.0%} < {config.oracle_min_agreement:.0%} under {described} — the run's "
        f"settings changed the answers of {differ} beyond the tolerance"
    )


def _ids_of(outcome) -> bool:
    return outcome is not None and not isinstance(outcome, Exception) and outcome.prompt_token_ids is not None


def _token_ids(engine, sample: dict, outcome, config: CanaryConfig) -> tuple[list[int], list[int]]:
    """(the prompt's token ids, the run's first answer token ids): the re-run's own where it said
    what the run said, else the run's text tokenized; an empty answer is the end of sequence."""
    from nightshift.validation.rows import rerun_token_ids

    answer = rerun_token_ids(outcome, sample["text"])
    answer = engine.tokenizer.encode(sample["text"], add_special_tokens=False) if answer is None else answer
    return list(outcome.prompt_token_ids), (answer[: config.oracle_tokens] or [engine.tokenizer.eos_token_id])


def _scores(engine, scored: list[tuple[dict, list[int], list[int]]], top_k: int, together: bool) -> list:
    """Each (prompt, answer) scored as one prompt by `engine`: all in one batch, or one at a time."""
    from nightshift.engine import vllm_adapter
    from nightshift.wire.openai_format import PreparedRequest

    requests = [
        PreparedRequest(
            key=index,
            custom_id=sample["custom_id"],
            kind="completion",
            prompt=prompt + answer,
            sampling_params=vllm_adapter.scoring_params(top_k),
            adapter=sample["adapter"],
        )
        for index, (sample, prompt, answer) in enumerate(scored)
    ]
    batches = [requests] if together else [[request] for request in requests]
    outputs: dict[int, object] = {}
    for batch in batches:
        outputs.update((request.key, output) for request, output in engine.generate(batch))
    starts = [len(prompt) for _, prompt, _ in scored]
    return [_token_scores(outputs[index], starts[index]) for index in range(len(requests))]


def _token_scores(output, start: int):
    from nightshift.engine import vllm_adapter

    if isinstance(output, Exception):
        raise output
    return vllm_adapter.prompt_token_scores(output, start)


def _outcome(custom_id: str, scores: list[tuple[float, int, float]], config: CanaryConfig) -> SettingsGateOutcome:
    verdicts = [(rank, best - mine) for mine, rank, best in scores]
    worst_rank, worst_gap = max(verdicts)
    agrees = all(rank < config.oracle_top_k and gap <= config.oracle_logprob_tolerance for rank, gap in verdicts)
    return SettingsGateOutcome(
        custom_id=custom_id, agrees=agrees, tokens=len(scores), worst_rank=worst_rank, worst_gap=round(worst_gap, 4)
    )
