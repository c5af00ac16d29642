"""Query filters over REST v2.0: what the query string can say (``field[__op]=value``, restful.py's
``_filterable_args``) and what the transport turns into a pattern (``^``, ``$``, ``in``, an OR on one
field, a string restful.py would read back as a number or a boolean), checked on the wire: each
filter answers over REST exactly what it answers over JSON-RPC, against the same simulator."""

from __future__ import annotations

from typing import Any

import pytest

from truenas_incus_operator.truenas import APIUnavailable
from truenas_incus_operator.truenas.transports.rest import _path, _query_string
from truenas_simulator.services.storage import Dataset

from .test_client import client_for, serve
from .test_simulator import session

DATASETS = ["tank/a.b", "tank/axb", "tank/a.b/c", "tank/123", "tank/x(y)", "tank/x(y)z"]
FILTERS: list[list[Any]] = [
    [["id", "=", "tank/a.b"]],
    [["id", "^", "tank/a.b"]],
    [["id", "$", "(y)"]],
    [["id", "in", ["tank/a.b", "tank/x(y)", "tank/nothing"]]],
    [["OR", [["id", "=", "tank/a.b"], ["id", "^", "tank/a.b/"]]]],
    [["OR", [[["id", "=", "tank/123"]], [["id", "^", "tank/x"]]]]],
    [["id", "=", "123"]],  # restful.py would read 123 as a number, true as a boolean
    [["pool", "=", "true"]],
    [["id", "~", "^tank/a.b(/|$)"]],
    [["id", "^", "tank/"], ["id", "!=", "tank/axb"]],
    [["id", "^", "123"]],  # a pattern that reads as a number: wrapped
    [["id", "$", "(y)"], ["id", "^", "tank/x"]],
]


@pytest.mark.parametrize("profile", ["25.04.0", "25.10"])
async def test_each_filter_answers_over_rest_what_it_answers_over_json_rpc(profile: str) -> None:
    async with serve(profile) as (sim, server):
        own = session(sim)
        for name in DATASETS:
            await sim.call(own, "pool.dataset.create", [{"name": name}])
        for pool in ("123", "true"):  # pools whose names restful.py would read as a number, a boolean
            sim.storage.datasets[pool] = Dataset(pool)
        async with client_for(server, "websocket") as rpc, client_for(server, "rest") as rest:
            for filters in FILTERS:
                over_rpc = await rpc.transport.call("pool.dataset.query", filters, {}, idempotent=True)
                over_rest = await rest.transport.call("pool.dataset.query", filters, {}, idempotent=True)
                expected = sorted(e["id"] for e in over_rpc)
                assert sorted(e["id"] for e in over_rest) == expected, filters
                assert expected, f"{filters} matches nothing: it proves nothing"


def test_what_the_query_string_cannot_say_is_refused_not_dropped() -> None:
    """Hostile review: order_by with a limit answered other rows, a re-typed value under another
    operator answered wrongly or crashed TrueNAS (HTTP 500), a ~ inside an OR lost its flags."""
    for filters, options in [
        ([["id", "in", [1, 2]]], {}),  # a pattern matches strings only
        ([["OR", [["id", "=", "a"], ["name", "=", "b"]]]], {}),  # two fields
        ([["name", "!=", "123"]], {}),  # restful.py would compare with the number 123
        ([["n", "=", -1]], {}),  # would arrive as the string "-1"
        ([["n", ">", 1.5]], {}),
        ([["OR", [["name", "~", "(?i)abc"], ["name", "=", "x"]]]], {}),
        ([], {"order_by": ["-id"], "limit": 1}),
        ([], {"get": True}),
        ([], {"count": True}),
    ]:
        with pytest.raises(APIUnavailable, match="REST cannot express"):
            _query_string((filters, options))
    # A pattern that would read back as a number or a constant is wrapped, and still means the same.
    assert _query_string(([["name", "^", "123"]], {})) == [("name__regex", "(?:123)")]
    assert _query_string(([["name", "~", "true"]], {})) == [("name__regex", "(?:true)")]
    with pytest.raises(APIUnavailable, match="cannot name the item"):
        _path("/pool/snapshot/id/{0}", ("..",))
    assert _query_string(([], {"extra": {"retrieve_children": False}, "limit": 5, "select": ["id"]})) == [
        ("limit", "5"),
        ("extra.retrieve_children", "false"),
    ]


def test_an_items_id_is_one_encoded_path_segment() -> None:
    assert _path("/pool/snapshot/id/{0}", ("tank/.ix-virt/containers/web@tio-1",)) == (
        "/pool/snapshot/id/tank%2F.ix-virt%2Fcontainers%2Fweb%40tio-1"
    )
    assert _path("/pool/snapshottask/id/{0}", (7,)) == "/pool/snapshottask/id/7"
