"""deploy/grafana/s3ckptfs.json: a well-formed dashboard whose queries name only metrics a live
daemon exposes (scraped from a real mount, so a renamed metric breaks this test, not the dashboard)."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "s3ckptfs.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def used_metrics() -> set[str]:
    names = set()
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\bs3ckptfs_[a-z_]+", target["expr"]))
    return names


def test_dashboard_is_well_formed():
    board = dashboard()
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
        assert panel["targets"] and all(target["expr"] for target in panel["targets"])
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in ("pending", "throughput", "fail", "durable", "fuse error"):
        assert topic in titles, topic


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.fuse
def test_dashboard_queries_name_metrics_the_daemon_exposes(bucket, mount_factory):
    port = free_port()
    mount = mount_factory(bucket, "m", options={"metrics_port": port})
    (mount.path / "x.bin").write_bytes(b"x" * 1000)
    mount.sync()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    exposed = families | {name for family in families for name in (family + suffix for suffix in SUFFIXES)}
    missing = used_metrics() - exposed
    assert not missing, f"the dashboard queries metrics the daemon does not expose: {sorted(missing)}"
