"""Which of a run's rows each check may sample, read as a stream from the run directory.

- **oracle**: greedy, unconstrained, text-only rows (scored token by token against the
  reference), and sampled rows with no seed whose tokens the run kept (nightshift.stages.chunks keeps
  the first tokens of a systematic sample of sampled rows: a sampled text need not re-tokenize
  to the tokens the engine drew), scored for plausibility — the run's tokens must be no more
  surprising to the reference, on average, than its own sampling would be;
- **determinism**: greedy rows, constrained ones too (forced tool calls, JSON schemas), and
  sampled rows that carry a seed — each must come back the same when asked again;
- **settings gate**: greedy, unconstrained, text-only rows (teacher-forced under a contrasting
  setting), sampled apart from the oracle's: sampled rows in the oracle's pool take none of its places.
"""

from __future__ import annotations

import random

import orjson

from nightshift.config import JobSpec
from nightshift.runtime.rundir import RunDir
from nightshift.runtime.storage import duckdb_connection, local_copies, sql_path
from nightshift.stages.canaries import CANARY_PREFIX
from nightshift.wire.images import image_parts

# Body fields under which the engine's tokens are not the model's own most likely ones (an
# end-of-sequence suppressed, a bias, a grammar): the reference would rightly rank them lower.
CONSTRAINED = (
    "response_format", "ignore_eos", "min_tokens", "logit_bias", "allowed_token_ids", "bad_words",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools",
)  # fmt: skip
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}  # other values reshape logits


def roles(body: dict, chat: bool) -> set[str]:
    """The checks a succeeded chat or completions row may be sampled for."""
    if body.get("n", 1) != 1 or body.get("temperature") is None:  # no temperature: the model's default, unknown
        return set()
    constrained = any(body.get(name) for name in CONSTRAINED) or any(
        body.get(name, neutral) != neutral for name, neutral in _NEUTRAL.items()
    )
    text_only = not (chat and image_parts(body["messages"]))  # the oracle's reference reads text only
    if body["temperature"] == 0:
        return {"determinism", "oracle", "settings_gate"} if not constrained and text_only else {"determinism"}
    if body.get("seed") is not None:
        return {"determinism"}
    # no seed: scored for plausibility (top_p / top_k / min_p keep the head: still plausible)
    return {"oracle"} if not constrained and text_only else set()


class Pools:
    """Reproducible samples of a run's rows per check, kept apart per model (the base's rows and
    each LoRA adapter's), and how many generated rows there were to choose from."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.generated = 0
        self._samples: dict[tuple[str, str | None], _Sample] = {}

    def offer(self, item: dict, checks: set[str]) -> None:
        for check in sorted(checks):
            sample = self._samples.setdefault((check, item["adapter"]), _Sample(self.size))
            if (slot := sample.slot()) is not None:
                sample.items[slot] = item

    def of(self, check: str, count: int) -> list[dict]:
        """Up to `count` rows for `check` of the base model and as many of each adapter."""
        keys = sorted((key for key in self._samples if key[0] == check), key=lambda key: key[1] or "")
        return [item for key in keys for item in self._samples[key].chosen()[:count]]


def checkable_rows(run_dir: RunDir, job: JobSpec, count: int) -> Pools:
    """Up to `count` succeeded chat and completions rows per check and model, sampled reproducibly."""
    pools = Pools(count)
    if count <= 0:
        return pools
    adapters = job.adapter_names()
    rows = generated_rows(
        run_dir,
        job,
        "c.custom_id, c.text, s.request, c.token_ids",
        "c.finish_reason IS NOT NULL AND c.text IS NOT NULL",
    )
    for custom_id, text, request, token_ids in rows:
        row = orjson.loads(request)
        body, chat = row["body"], "messages" in row["body"]
        if not (chat or isinstance(body.get("prompt"), str)):  # a completion's prompt as text: scored as given
            continue
        pools.generated += 1
        checks = roles(body, chat)
        if checks == {"oracle"} and body["temperature"] and not token_ids:  # sampled, no seed: only with its tokens
            checks = set()
        if checks:
            adapter = body.get("model") if body.get("model") in adapters else None
            item = {"custom_id": custom_id, "text": text, "body": body, "adapter": adapter, "token_ids": token_ids,
                    "url": row.get("url", "/v1/chat/completions")}  # fmt: skip
            pools.offer(item, checks)
    return pools


def embedded_rows(run_dir: RunDir, job: JobSpec, count: int) -> list[dict]:
    """Up to `count` embedded text rows of the run (vector and the text embedded), sampled
    reproducibly; none for a run that embedded nothing."""
    if count <= 0:
        return []
    sample = _Sample(count)
    rows = generated_rows(
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


def generated_rows(run_dir: RunDir, job: JobSpec, columns: str, where: str, lazy: str | None = None):
    """The run's succeeded rows (`c`, their best outcome) beside their planned requests (`s`),
    shard by shard in input order, as tuples of `columns`: a run of millions of rows is read as
    a stream, and costs validation no more memory than one of thousands. Canary rows are not
    the run's own and are left out."""
    from nightshift.records import Plan
    from nightshift.stages.chunks import best_rows_sql, chunk_files, shard_cache_key

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
        self._shuffled = False

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
        if not self._shuffled:
            self._random.shuffle(self.items)
            self._shuffled = True
        return self.items


def _tuples(relation, lazy: str | None = None):
    """A query's rows as tuples, 8,192 at a time; the column named `lazy` stays an Arrow scalar
    (`.as_py()` it when needed: a vector per row would be millions of Python floats)."""
    for batch in relation.to_arrow_reader(8192):
        names = batch.schema.names
        columns = [batch.column(name) if name == lazy else batch.column(name).to_pylist() for name in names]
        yield from zip(*columns)


def rerun_text(outcome) -> str | None:
    """A re-run's text: None where the row failed or was not re-run."""
    return None if outcome is None or isinstance(outcome, Exception) else outcome.outputs[0].text


def rerun_token_ids(outcome, text: str) -> list[int] | None:
    """The re-run's token ids where it said what the run said (`text`): the run's own tokens, which
    re-tokenizing the text may split otherwise; None where it was not re-run, failed, said
    otherwise, or came from an engine server (no ids)."""
    if rerun_text(outcome) != text:
        return None
    token_ids = outcome.outputs[0].token_ids
    return list(token_ids) if token_ids is not None else None
