"""How a CPU engine is sized when the job leaves it open: a KV cache of its own (so that a second
engine on the host can start), and as many rows decoded together as that cache holds."""

import pytest

from nightshift.engine.sizing import CPU_ROW_TOKENS, cpu_max_num_seqs, engine_arguments, kv_bytes_per_token
from nightshift.jobs import make_job
from nightshift.models import model_dir

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
    from nightshift.engine.sizing import throughput_traps

    sound = {"max_num_seqs": 256, "enforce_eager": False, "enable_prefix_caching": True}
    assert throughput_traps(sound, on_gpu=True) == []
    small_eager = {**sound, "max_num_seqs": 8, "enforce_eager": True, "enable_prefix_caching": False}
    traps = throughput_traps(small_eager, on_gpu=True)
    assert len(traps) == 3 and "max_num_seqs 8" in traps[0] and "eager" in traps[1] and "prefix" in traps[2]
    # on a CPU a small batch and eager mode are what the engine should run
    assert throughput_traps({**small_eager, "enable_prefix_caching": True}, on_gpu=False) == []


def test_on_a_gpu_graphs_are_captured_without_compiling_once_the_decode_pays_for_them(monkeypatch):
    """From the H200's figures (docs/benchmarks.md): the 7 s capture pays once the expected decode
    passes about 76 s; a user's own choice stands; on CPU, eager."""
    from nightshift.config import EngineConfig
    from nightshift.engine import sizing as engine_sizing

    config = EngineConfig(model=str(model_dir("smollm2")))
    assert engine_sizing.choose_enforce_eager(config, 10**7).enforce_eager is True  # this CPU
    monkeypatch.setattr(engine_sizing, "platform_is_cpu", lambda: False)
    decode = engine_sizing.expected_decode_seconds(config, 1000)
    pays_from = int(1000 * engine_sizing.GRAPHS_COST_S / engine_sizing.GRAPHS_GAIN / decode) + 1
    short, long = (
        engine_sizing.choose_enforce_eager(config, pays_from // 2),
        engine_sizing.choose_enforce_eager(config, pays_from * 2),
    )
    assert short.enforce_eager is True and not short.engine_args
    assert long.enforce_eager is False
    assert long.engine_arg_values == {"compilation_config": engine_sizing.GRAPHS_WITHOUT_COMPILE}
    unknown = engine_sizing.choose_enforce_eager(config, None)
    assert unknown.enforce_eager is False  # a job of unknown size: the capture is cheap next to a long night
    own = config.model_copy(update={"engine_args": ('compilation_config={"mode": 3}',)})
    assert engine_sizing.choose_enforce_eager(own, pays_from * 2).engine_arg_values["compilation_config"] == {"mode": 3}
    compiled = config.model_copy(update={"enforce_eager": False})
    assert engine_sizing.choose_enforce_eager(compiled, pays_from * 2) == compiled  # vLLM's compiled default


def test_platform_defaults_float32_on_cpu_the_models_own_dtype_and_most_of_a_card_on_a_gpu():
    from nightshift.config import EngineConfig
    from nightshift.engine.sizing import with_platform_defaults

    config = EngineConfig(model=str(model_dir("tiny")))
    on_cpu, on_gpu = with_platform_defaults(config, on_cpu=True), with_platform_defaults(config, on_cpu=False)
    assert (on_cpu.dtype, on_cpu.gpu_memory_utilization) == ("float32", None)
    assert (on_gpu.dtype, on_gpu.gpu_memory_utilization) == ("auto", 0.9)
    given = config.model_copy(update={"dtype": "bfloat16", "gpu_memory_utilization": 0.5})
    assert with_platform_defaults(given, on_cpu=False) == given


def test_engine_arguments_pass_through_checked_against_vllm():
    from nightshift.engine.sizing import engine_arguments
    from nightshift.errors import ConfigurationError
    from nightshift.jobs import check_job, make_job

    job = make_job("tiny", engine_args=["kv_offloading_size=2", 'hf_overrides={"rope_theta": 10000.0}'])
    assert engine_arguments(job.engine)["hf_overrides"] == {"rope_theta": 10000.0}
    assert engine_arguments(job.engine)["kv_offloading_size"] == 2
    with pytest.raises(ConfigurationError, match="no warp_speed"):
        check_job(make_job("tiny", engine_args=["warp_speed=11"]))
    with pytest.raises(ConfigurationError, match="a setting of its own"):
        make_job("tiny", engine_args=["dtype=half"])
