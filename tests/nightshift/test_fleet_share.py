"""The fleet budget's arithmetic and a run's class on a shared server (no server needed): shares
by class weight never add up to more than the fleet's limit, and a class maps onto the server's
priority, always after online traffic's."""

import pytest

from nightshift.config import PRIORITY_CLASSES, EngineSettings
from nightshift.engine.fleet import fair_share, limit_names
from nightshift.engine.remote import row_priority

pytestmark = pytest.mark.fast
URL = "http://gpu-1:8000/v1"


@pytest.mark.parametrize("limit", [1, 2, 5, 6, 13, 64])
@pytest.mark.parametrize("classes", [["nightly"] * 3, ["urgent", "backfill"], ["urgent", "nightly", "backfill"]])
def test_shares_by_class_weight_never_add_up_to_more_than_the_limit_once_it_has_room(limit, classes):
    weights = [PRIORITY_CLASSES[c][1] for c in classes]
    shares = [fair_share(limit, w, sum(weights), most=64) for w in weights]
    assert all(share >= 1 for share in shares), "every client may send a row"
    assert sum(shares) <= max(limit, len(classes)), shares
    if limit >= 13:
        urgent_first = sorted(zip(weights, shares), reverse=True)
        assert [s for _, s in urgent_first] == sorted(shares, reverse=True), "a heavier class gets no less"


def test_a_share_is_capped_at_the_clients_own_most_and_alone_it_takes_the_whole_limit():
    assert fair_share(40, 2, 2, most=16) == 16
    assert fair_share(9, 1, 1, most=64) == 9


def test_a_class_maps_onto_the_servers_priority_after_online_traffic_and_engine_priority_wins():
    urgent, backfill = (EngineSettings(engine_url=URL, priority_class=c) for c in ("urgent", "backfill"))
    assert 0 < row_priority({}, urgent) < row_priority({}, backfill), "online's 0 first, then urgent, backfill"
    assert row_priority({}, EngineSettings(engine_url=URL)) is None, "no class, no priority: a FCFS server works"
    assert row_priority({}, EngineSettings(engine_url=URL, priority_class="urgent", engine_priority=7)) == 7
    assert urgent.fleet_weight > EngineSettings(engine_url=URL).fleet_weight > backfill.fleet_weight
    with pytest.raises(ValueError, match="priority_class orders rows on a shared server"):
        EngineSettings(priority_class="urgent")


def test_each_server_has_its_own_fleet_limit_and_a_trailing_slash_is_the_same_server():
    assert limit_names(URL) == limit_names(URL + "/") != limit_names("http://gpu-2:8000/v1")
    assert limit_names(URL)[1] == limit_names(URL)[0] + "-clients"
