"""`nightshift run`'s console: on a terminal, log lines print above one live progress line,
never through it; elsewhere, plain periodic lines."""

import io
import logging
import re
import sys
import time

import pytest

from nightshift.runtime import progress
from nightshift.runtime.progress import ConsoleProgress, Progress
from nightshift.runtime.rundir import RunDir

pytestmark = pytest.mark.fast


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: characters overwrite at the cursor; carriage
    return, newline, cursor-up and erase-line move or clear it; other escape sequences (colours,
    cursor visibility) draw nothing."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token == "\x1b[2K":
                lines[row] = ""
        else:
            line = lines[row].ljust(col)
            lines[row], col = line[:col] + token + line[col + 1 :], col + 1
    return [line.rstrip() for line in lines]


def test_log_lines_and_stray_output_print_above_the_live_progress_line(tmp_path, monkeypatch):
    from prefect.logging.handlers import PrefectConsoleHandler

    terminal = Terminal()
    handler = PrefectConsoleHandler(stream=terminal)  # as Prefect's logging.yml makes it
    handler.setFormatter(logging.Formatter("12:00:00.000 | %(levelname)-7s | %(message)s"))
    logger = logging.getLogger("nightshift.test-console")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    tracker = Progress(RunDir(tmp_path), total=100, completed=0)
    monkeypatch.setattr(progress, "_trackers", {"run": tracker})  # this run's alone, whatever ran before
    try:
        with ConsoleProgress(terminal, width=10):
            tracker.advance(40, 4000)
            time.sleep(1.2)  # the bar is drawn
            logger.info("merged 40 rows: 40 in output.jsonl")
            print("a stray print")
            sys.stderr.write("a stray warning\n")
            time.sleep(1.2)
    finally:
        logger.removeHandler(handler)

    shown = [line for line in screen(terminal.getvalue()) if line]
    assert "12:00:00.000 | INFO    | merged 40 rows: 40 in output.jsonl" in shown
    assert "a stray print" in shown and "a stray warning" in shown
    assert shown[-1].startswith("[####......] 40/100 rows"), shown
    assert sum("rows" in line and "tokens/s" in line for line in shown) == 1, "one progress line, at the bottom"
    assert handler.console.file is terminal, "the handler's own console is given back"


def test_elsewhere_progress_is_a_plain_line_a_minute():
    from nightshift.records import ProgressSnapshot

    state = ProgressSnapshot(
        completed=250, total=1000, elapsed_seconds=10, rolling_tokens_per_second=1234.5, eta_seconds=125.0, updated=0
    )
    console = ConsoleProgress(io.StringIO(), width=10)
    assert not console.tty and console.interval == 60
    assert console.line(state) == "progress [##........] 250/1,000 rows 1,234 tokens/s ETA 00:02:05\n"
