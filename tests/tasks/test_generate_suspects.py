"""Specification of the two-deaths rule, the fast representative of the kill drill
tests/flows/test_engine_faults.py::test_a_row_that_kills_the_engine_twice_is_set_aside_then_retried
(a drill: it kills a real engine's processes twice and starts three engines).

The generate stage runs against an engine double shaped as an engine server (answers carry their
own bodies) that dies as the real one does when a poison row is admitted: every row admitted and
unfinished is in flight. The stage, the chunk files, the suspects file and the merge are the real ones.
Not in the fast layer: preparing a row validates it with vLLM's request models (vLLM is imported).
"""

import pytest
from conftest import chat_request, read_jsonl, write_jsonl

from nightshift.engine.local import EngineFailure
from nightshift.jobs import make_job
from nightshift.runtime.rundir import RunDir
from nightshift.stages import generate as stage
from nightshift.stages.chunks import Suspects, shard_cache_key
from nightshift.stages.merge import merge
from nightshift.stages.plan import plan
from nightshift.wire.openai_format import RemoteCompletion

POISON = "poison"


class DyingEngine:
    """An engine server's shape; admitting the poison row, while `poisoned`, kills it."""

    runner_type = "generate"
    tokenizer = None
    model_config = None
    default_sampling_params: dict = {}
    max_model_len = 2048
    settings: dict = {"max_num_seqs": 4}
    load_seconds = 0.0
    alive = True

    def __init__(self, config) -> None:
        self.config = config
        self.announced: set[str] = set()
        self.batches: list[list[str]] = []  # the custom_ids of each call, as admitted
        self.poisoned = True

    def describe(self) -> str:
        return "engine double ready"

    def politeness_timeline(self, since):
        return None

    def generate(self, requests, stop=None, grace_s=20.0):
        requests = list(requests)
        ids = [r.custom_id for r in requests]
        self.batches.append(ids)
        if self.poisoned and POISON in ids:
            admitted = requests[: ids.index(POISON) + 1]
            raise EngineFailure("engine died", in_flight=[r.key for r in admitted])
        for request in requests:
            body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"re {request.custom_id}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}  # fmt: skip
            yield request, RemoteCompletion(body, request.kind)

    def close(self) -> None:
        pass


@pytest.fixture
def shard_with_poison(tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path / "run")
    job = make_job("tiny", keep_order=True)
    job.save(run_dir.job)
    rows = [chat_request(f"r{i}", f"Row {i}") for i in range(6)]
    rows.insert(3, chat_request(POISON, "this row kills the engine"))
    planned = plan(str(write_jsonl(tmp_path / "in.jsonl", rows)), run_dir, shard_size=100)
    engine = DyingEngine(job.engine)
    monkeypatch.setattr(stage, "get_engine", lambda config: engine)
    return run_dir, job, planned, engine


def test_a_row_the_engine_dies_under_twice_is_set_aside_and_nightshift_retry_gives_it_another_chance(
    shard_with_poison,
):
    run_dir, job, planned, engine = shard_with_poison
    (shard,) = planned.shards

    def suspects() -> dict[int, int]:
        return Suspects(run_dir.shard_output(shard_cache_key(shard, job))).counts

    with pytest.raises(EngineFailure):  # first death: every row admitted with the poison is a suspect
        stage.generate(shard, job, run_dir)
    assert suspects() == {0: 1, 1: 1, 2: 1, 3: 1}

    with pytest.raises(EngineFailure):  # the task's retry: suspects alone and first, so the poison alone dies
        stage.generate(shard, job, run_dir)
    assert engine.batches[1:] == [["r0"], ["r1"], ["r2"], [POISON]]
    assert suspects() == {0: 1, 1: 1, 2: 1, 3: 2}

    result = stage.generate(shard, job, run_dir)  # the second retry: the poison is set aside unsent
    assert engine.batches[5:] == [["r3", "r4", "r5"]]
    assert (result.succeeded, result.failed) == (6, 1)

    engine.poisoned = False  # `nightshift retry`: the set-aside row runs again and its death count is forgiven
    retried = stage.generate(shard, job, run_dir, only_rows={3})
    assert engine.batches[6:] == [[POISON]] and retried.failed == 0 and 3 not in suspects()

    merge(planned, [retried], run_dir)
    assert [line["custom_id"] for line in read_jsonl(run_dir.output)] == ["r0", "r1", "r2", POISON, "r3", "r4", "r5"]
    assert read_jsonl(run_dir.errors) == []


def test_the_generate_task_is_retried_often_enough_for_a_row_to_die_twice_and_be_set_aside():
    """The rule needs three attempts of the shard task on an engine failure: two deaths, then the set-aside."""
    from tasks.s3_generate import _retry_unless_preempted, generate_shard

    assert generate_shard.retries >= 2 and EngineFailure.retryable
    assert generate_shard.retry_condition_fn is _retry_unless_preempted
