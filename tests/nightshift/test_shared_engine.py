"""`serve --shared-engine`: the one engine server's command, sized as a run's own engine, and the
settings it cannot go with (the server itself and two batches on it: tests/test_batch_api.py)."""

import pytest

from nightshift.batch_api.shared_engine import server_command, server_flags
from nightshift.config import BatchApiConfig

pytestmark = pytest.mark.fast


def test_engine_arguments_become_the_servers_flags():
    flags = server_flags({"max_num_seqs": 64, "enforce_eager": True, "enable_prefix_caching": False,
                          "compilation_config": {"mode": 0}})  # fmt: skip
    assert flags == ["--max-num-seqs", "64", "--enforce-eager", "--no-enable-prefix-caching",
                     "--compilation-config", '{"mode": 0}']  # fmt: skip


def test_the_server_is_the_chat_model_sized_as_a_run_would_size_it_with_priorities_and_cached_tokens(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.25")
    command = server_command("tiny", 8123)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    served = dict(zip(command[3::2], command[4::2]))
    assert served["--served-model-name"] == "tiny" and served["--host"] == "127.0.0.1"  # never beyond this machine
    assert {"--scheduling-policy", "priority"} <= set(command) and "--enable-prompt-tokens-details" in command
    assert "--model" in command and "--dtype" in command and "--max-num-seqs" in command
    assert served["--kv-cache-memory-bytes"] == str(1024**3 // 4), "a fraction of a GiB, which vLLM's variable refuses"


@pytest.mark.parametrize(
    "settings",
    [
        {"chat_engine_url": "http://gpu-1:8000/v1"},
        {"deployment": "nightshift-batch/nightly"},
        {"chat_lora": ["sql=/adapters/sql"]},
    ],  # fmt: skip
)
def test_a_shared_engine_is_refused_beside_a_server_another_machines_runs_or_adapters(settings, tmp_path):
    with pytest.raises(ValueError, match="shared_engine starts a server of chat_model on this machine"):
        BatchApiConfig(storage=str(tmp_path), shared_engine=True, **settings)


def test_an_online_objective_is_kept_on_the_shared_engine(tmp_path):
    config = BatchApiConfig(storage=str(tmp_path), shared_engine=True, online_ttft_slo_ms=500)
    assert config.online_ttft_slo_ms == 500
    with pytest.raises(ValueError, match="give chat_engine_url or shared_engine"):
        BatchApiConfig(storage=str(tmp_path), online_ttft_slo_ms=500)
