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
