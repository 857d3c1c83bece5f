"""How a CPU engine is sized when the job leaves it open: a KV cache of its own (so that a second
engine on the host can start), and as many rows decoded together as that cache holds."""

import pytest

from nightshift.engine_sizing import CPU_ROW_TOKENS, cpu_max_num_seqs, engine_arguments, kv_bytes_per_token
from nightshift.jobs import make_job

pytestmark = pytest.mark.fast
MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny():
    return make_job("tiny").engine


def rows_worth(config, rows: int) -> int:
    return rows * CPU_ROW_TOKENS * kv_bytes_per_token(config)


def test_rows_decoded_together_are_as_many_as_the_cache_holds(tiny):
    assert cpu_max_num_seqs(tiny, rows_worth(tiny, 300)) == 300
    assert cpu_max_num_seqs(tiny, rows_worth(tiny, 300) + 1) == 300


def test_never_fewer_than_vllms_cpu_default_nor_more_than_its_largest(tiny):
    assert cpu_max_num_seqs(tiny, rows_worth(tiny, 10)) == 256
    assert cpu_max_num_seqs(tiny, rows_worth(tiny, 100_000)) == 1024


def test_what_the_job_sets_is_kept(tiny, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    arguments = engine_arguments(tiny.model_copy(update={"max_num_seqs": 16, "kv_cache_memory_bytes": 64 * MiB}))
    assert arguments["max_num_seqs"] == 16 and arguments["kv_cache_memory_bytes"] == 64 * MiB


def test_a_cache_sized_in_the_environment_sizes_the_rows_too(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")  # GiB
    arguments = engine_arguments(tiny)
    assert "kv_cache_memory_bytes" not in arguments  # vLLM reads the environment itself
    assert arguments["max_num_seqs"] == cpu_max_num_seqs(tiny, 256 * MiB)


def test_settings_that_throw_throughput_away_are_named_and_sound_ones_are_not():
    from nightshift.engine_sizing import throughput_traps

    sound = {"max_num_seqs": 256, "enforce_eager": False, "enable_prefix_caching": True}
    assert throughput_traps(sound, on_gpu=True) == []
    small_eager = {**sound, "max_num_seqs": 8, "enforce_eager": True, "enable_prefix_caching": False}
    traps = throughput_traps(small_eager, on_gpu=True)
    assert len(traps) == 3 and "max_num_seqs 8" in traps[0] and "eager" in traps[1] and "prefix" in traps[2]
    # on a CPU a small batch and eager mode are what the engine should run
    assert throughput_traps({**small_eager, "enable_prefix_caching": True}, on_gpu=False) == []
