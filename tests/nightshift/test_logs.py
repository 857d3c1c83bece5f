"""Specification: in a Nightshift process, vLLM never reconfigures Python's logging.

vLLM's logging configuration (a `dictConfig` from inside `LLM(...)`) flushes every live
handler while it holds the logging lock; run from the background engine start while Prefect's
API log handler is live, it deadlocked runs at engine start (issue 27)."""

from __future__ import annotations

import json
import logging
import os

import pytest

pytestmark = pytest.mark.fast


class RecordingHandler(logging.Handler):
    """A live handler like Prefect's: it remembers being flushed or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.touched: list[str] = []

    def emit(self, record) -> None:
        pass

    def flush(self) -> None:
        self.touched.append("flush")

    def close(self) -> None:
        self.touched.append("close")
        super().close()


def test_importing_nightshift_turns_vllms_logging_configuration_off_for_it_and_its_children():
    from vllm.config.logging import LoggingConfig

    import nightshift  # noqa: F401 (its import is the subject)

    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"  # inherited by the engine's processes and every child
    assert LoggingConfig().configure_logging is False  # what LLM(...) builds its logging config from


def test_the_configuration_step_llm_runs_leaves_live_handlers_alone():
    from vllm.config.logging import LoggingConfig
    from vllm.logger import configure_logging

    live = RecordingHandler()
    logging.getLogger().addHandler(live)
    try:
        configure_logging(LoggingConfig())  # as LLM.__init__ does on the engine-start thread
    finally:
        logging.getLogger().removeHandler(live)
    assert live.touched == []


def test_a_users_request_for_vllms_own_configuration_is_overruled(monkeypatch):
    from nightshift.observe.logs import keep_vllm_from_configuring_logging

    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "1")
    keep_vllm_from_configuring_logging()
    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"


def test_a_vllm_logging_file_is_applied_once_by_nightshift_and_kept_from_vllm(tmp_path, monkeypatch):
    from vllm.config.logging import LoggingConfig

    from nightshift.observe.logs import keep_vllm_from_configuring_logging

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {"vllm.test_logs_probe": {"level": "CRITICAL"}},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", str(path))
    keep_vllm_from_configuring_logging()
    assert logging.getLogger("vllm.test_logs_probe").level == logging.CRITICAL
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ
    LoggingConfig()  # vLLM refuses a logging file with its configuration off: it no longer sees one


def test_the_vllm_logger_has_the_asked_level_and_one_handler(monkeypatch):
    from nightshift.observe.logs import set_vllm_log_level

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    set_vllm_log_level("ERROR")
    set_vllm_log_level("WARNING")
    logger = logging.getLogger("vllm")
    ours = [handler for handler in logger.handlers if handler.get_name() == "nightshift-vllm"]
    assert logger.level == logging.WARNING and len(ours) == 1 and not logger.propagate
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_importing_nightshift_leaves_the_level_a_command_chooses_to_the_command(monkeypatch):
    """The import gives the logger vLLM's default level but does not write it down as if asked:
    `nightshift run` (ERROR unless --verbose) must still see the level as unset."""
    from nightshift.observe.logs import keep_vllm_from_configuring_logging

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    keep_vllm_from_configuring_logging()
    assert "VLLM_LOGGING_LEVEL" not in os.environ
    assert logging.getLogger("vllm").level == logging.INFO
