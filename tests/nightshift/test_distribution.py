"""The distribution has a name of its own on the package index (`nightshift` there is an NMR
plotting library): `pip install nightshift-batch` gives the `nightshift` package and command."""

from importlib.metadata import distribution

import pytest

pytestmark = pytest.mark.fast


def test_the_distribution_is_nightshift_batch_and_installs_the_nightshift_command():
    dist = distribution("nightshift-batch")
    commands = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert commands["nightshift"] == "nightshift.cli:entry"
    assert {"cpu", "gpu", "dev"} <= set(dist.metadata.get_all("Provides-Extra"))


def test_every_package_folder_is_in_the_distribution():
    """An installed (not editable) Nightshift holds every subpackage: a folder missing from
    pyproject's `packages` imports from a checkout and fails from a wheel (nightshift.report did)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    repo = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(repo).parts) for p in (repo / "nightshift").rglob("__init__.py")}
    assert folders - listed == set(), "add them to [tool.setuptools] packages"
