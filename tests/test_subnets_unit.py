"""Which cluster subnets a session routes: the fewest that cover what the manager and the API server say."""
from __future__ import annotations

import pytest

from tpnb.connector.session import collapsed

pytestmark = pytest.mark.unit


def test_node_pod_cidrs_inside_the_cluster_range_are_that_range() -> None:
    # the dev cluster's case: the manager's cluster-wide /23 and the two nodes' /24s
    assert collapsed(["10.42.0.0/23", "10.42.0.0/24", "10.42.1.0/24"]) == ["10.42.0.0/23"]
    # adjacent node ranges merge, distant ones stay apart, duplicates go, order is by address
    assert collapsed(["10.42.3.0/24", "10.42.0.0/24", "10.42.1.0/24", "10.42.0.0/24"]) == [
        "10.42.0.0/23", "10.42.3.0/24"]


def test_both_families_and_nothing() -> None:
    assert collapsed(["fd00:10:42::/64", "10.42.0.0/24", "fd00:10:42::/56"]) == ["10.42.0.0/24", "fd00:10:42::/56"]
    assert collapsed([]) == []
