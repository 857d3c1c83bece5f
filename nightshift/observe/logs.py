"""Python's logging is configured once, from the importing thread, and never by vLLM.

vLLM's `LLM(...)` applies its logging configuration with `logging.config.dictConfig`, which
flushes and closes every existing handler while it holds the logging module's lock. Nightshift
starts its engine on a background thread while Prefect's handlers are live: the flush waits
for Prefect's log service, whose start (on a task's thread) waits for the logging lock — a
deadlock that left runs hanging forever at engine start, without a log line (issue 27). So in
every Nightshift process vLLM's own configuration is off (`VLLM_CONFIGURE_LOGGING=0`, which the
engine's processes and every child inherit), and the `vllm` logger gets its level and handler
here instead: a logger's level and handlers can be set without flushing anyone.
"""

from __future__ import annotations

import builtins
import json
import logging
import logging.config
import os
import re
import sys

VLLM_LOGGER = "vllm"
_HANDLER = "nightshift-vllm"
_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (a test's capture, a redirect),
    not to the stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def keep_vllm_from_configuring_logging() -> None:
    """Turn vLLM's logging configuration off for this process and its children, and give the
    `vllm` logger what vLLM's default would have: its level ($VLLM_LOGGING_LEVEL) and a handler.

    A logging file the operator gave vLLM ($VLLM_LOGGING_CONFIG_PATH) is applied here, once:
    vLLM refuses such a file while its own configuration is off."""
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    config_file = os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
    if config_file:
        with open(config_file, encoding="utf-8") as file:
            logging.config.dictConfig(json.load(file))
        return
    _configure_vllm_logger(os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))  # vLLM's default level


def set_vllm_log_level(level: str) -> None:
    """The `vllm` logger's level (INFO, WARNING, ERROR, ...) here and in the processes started
    from now on (the engine's among them: they import Nightshift, which reads it)."""
    os.environ["VLLM_LOGGING_LEVEL"] = level
    _configure_vllm_logger(level)


def _configure_vllm_logger(level: str) -> None:
    """The `vllm` logger's level, with Nightshift's handler (added once)."""
    logger = logging.getLogger(VLLM_LOGGER)
    logger.setLevel(level.upper())
    if not any(handler.get_name() == _HANDLER for handler in logger.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER)
        handler.setFormatter(logging.Formatter(_FORMAT, "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False  # as vLLM's default: its lines are the engine's, not the run's story


# What third parties print that tells a user nothing about their run, by default kept off the
# console (`--verbose` shows it): for this process and, through the environment, every process
# it starts (the engine's, the resource tracker's).
QUIET_ENVIRONMENT = {
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ warnings: "NUMA binding: Using MEMBIND policy …"
    "TQDM_DISABLE": "1",  # vLLM's "Loading safetensors checkpoint shards" bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar (the canary oracle)
    "VLLM_NO_USAGE_STATS": "1",  # vLLM's usage report: nothing is sent, nothing is said
    # the temporary Prefect server's "Prefect collects anonymous usage data…" notice, and the sending
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
QUIET_WARNINGS = (
    "ignore::FutureWarning",  # e.g. torch.distributed.reduce_op, through vLLM's Triton dispatcher
    "ignore::DeprecationWarning",
    "ignore::UserWarning:multiprocessing.resource_tracker",  # leaked semaphores at the engine's exit
)


def quiet_third_parties() -> None:
    """Keep third-party warnings and engine chatter off the console; settings the operator gave
    in the environment win."""
    import warnings

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    given = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join([*QUIET_WARNINGS, *given])  # later entries take precedence
    for spec in QUIET_WARNINGS:  # this process read PYTHONWARNINGS at its start: the same filters, now
        _, _, category, module = (spec.split(":") + [""])[:4]
        warnings.filterwarnings("ignore", category=getattr(builtins, category), module=re.escape(module))


class _OneLineForAFullDisk(logging.Filter):
    """A full disk is an expected end, said in one line with the path and the space
    (nightshift.runtime.storage.StorageFull): the console's records of it lose their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from nightshift.runtime.storage import is_device_full

        if record.exc_info and record.exc_info[1] is not None and is_device_full(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def every_handler() -> set[logging.Handler]:
    """The handlers of the root logger and of every logger created so far."""
    loggers = [logging.getLogger()]
    loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return {handler for logger in loggers for handler in logger.handlers}


def expected_failures_in_one_line() -> None:
    """On every console handler Prefect configured (and any writing to stderr): see above."""
    import prefect.main  # noqa: F401  (configures Prefect's logging: its handlers exist now)

    for handler in every_handler():
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, _OneLineForAFullDisk) for f in handler.filters
        ):
            handler.addFilter(_OneLineForAFullDisk())
