"""Each test file's cost in seconds, from a pytest `--junitxml` report, as tests/file_costs.json.

    .venv/bin/python -m pytest tests -m "not drill" -n 2 --dist loadfile --junitxml=times.xml
    .venv/bin/python scripts/file_costs.py times.xml > tests/file_costs.json

A junit test case's time is its setup, call and teardown together (pytest's default), so a
module's servers count in the file that starts them. conftest orders the files by it."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict


def file_costs(report: str) -> dict[str, float]:
    costs: dict[str, float] = defaultdict(float)
    for case in ElementTree.parse(report).iter("testcase"):
        module = case.get("classname", "").split(".")
        while module and module[-1][:1].isupper():  # a test class's name is not a file's
            module.pop()
        costs["/".join(module) + ".py"] += float(case.get("time", 0))
    return dict(sorted(((name, round(cost, 1)) for name, cost in costs.items()), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    json.dump(file_costs(sys.argv[1]), sys.stdout, indent=1)
    sys.stdout.write("\n")
