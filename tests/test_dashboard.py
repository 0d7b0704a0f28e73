"""The dashboard without a browser: its size budget and what ships in the wheel; against a
real gateway: its login (a token for an HttpOnly cookie; a wrong or removed token refused),
the read role, the one shared snapshot a second, and what it counts of MQTT traffic
(tokens' roles and the session table: tests/test_token_roles.py)."""

from __future__ import annotations

import fnmatch
import gzip
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapidmq_edge.ingress.dashboard.app import STATIC, static_files
from rapidmq_edge.security.tokens import remove_token

from .dashboard_helpers import DashboardGateway, Publisher, sse_frames

ROOT = Path(__file__).resolve().parent.parent
#: issue 15: everything the browser loads, gzipped
BUDGET_GZ = 150 * 1024


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardGateway]:
    g = DashboardGateway(tmp_path_factory.mktemp("dash")).start()
    yield g
    g.stop()


# -- the shipped files ---------------------------------------------------------------


def test_static_files_fit_the_budget_and_ship_in_the_wheel() -> None:
    files = static_files()
    assert {"index.html", "login.html", "app.js", "app.css", "vendor/uplot/uPlot.iife.min.js",
            "vendor/uplot/uPlot.min.css", "vendor/uplot/LICENSE"} <= set(files)
    total = sum(len(gzip.compress(raw, 9)) for raw, _, _ in files.values())
    assert total <= BUDGET_GZ, f"{total} bytes gzipped"
    assert "cdn" not in files["index.html"][0].decode().lower()
    assert b"1.6.32" in (STATIC / "vendor/uplot/VERSION").read_bytes()
    # every file is matched by pyproject's package-data globs
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["rapidmq_edge.ingress.dashboard"]
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", g) and
                   g.count("/") == f"static/{name}".count("/") for g in globs), name


# -- against a running gateway ---------------------------------------------------------


def test_login_sets_a_strict_httponly_cookie_and_wrong_tokens_are_refused(
        gw: DashboardGateway) -> None:
    status, headers, page = gw.get("/dashboard")
    assert status == 200 and "Token" in gw.get("/dashboard/login")[2].decode()
    assert gw.get("/")[::2] == (200, page)  # a browser pointed at the listener lands here
    status, headers = gw.login("rmq_wrong")
    assert status == 401 and "set-cookie" not in headers
    assert gw.get("/dashboard/events")[0] == 401
    assert gw.get("/dashboard/snapshot", "rmq_wrong")[0] == 401
    status, headers = gw.login(gw.read_token)
    assert status == 303 and headers["location"] == "/dashboard"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert gw.read_token not in cookie and gw.read_token not in gw.proc.log()
    assert "Content-Security-Policy" in gw.get("/dashboard/login")[1]


def test_a_read_token_may_look_but_not_publish(gw: DashboardGateway) -> None:
    import json
    import urllib.request

    body = json.dumps({"topic": "t/x", "payload": "1"}).encode()
    for token, want in ((gw.read_token, 403), (gw.admin_token, 200)):
        req = urllib.request.Request(gw.base + "/api/v1/publish", body, method="POST", headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        assert code == want
    assert gw.get("/dashboard/snapshot", gw.read_token)[0] == 200


def test_removing_a_token_ends_its_sessions(tmp_path: Path) -> None:
    g = DashboardGateway(tmp_path).start()
    try:
        status, headers = g.login(g.read_token)
        sid = headers["set-cookie"].split(";")[0]
        import urllib.request

        def with_cookie() -> int:
            req = urllib.request.Request(g.base + "/dashboard/snapshot", headers={"Cookie": sid})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert with_cookie() == 200
        remove_token(g.tokens_file, "viewer")
        deadline = time.monotonic() + 5  # the tokens file is re-read at most once a second
        while with_cookie() != 401:
            assert time.monotonic() < deadline, "session outlived its token"
            time.sleep(0.2)
    finally:
        g.stop()


def test_one_snapshot_a_second_shared_by_every_viewer(gw: DashboardGateway) -> None:
    """Three dashboards open for ~4 s: the gateway builds about one snapshot a second (not
    three), and every viewer gets the same frames."""
    frames: list[list[dict]] = [[], [], []]

    def read(i: int) -> None:
        frames[i] = list(sse_frames(gw.base, gw.read_token, 5))

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert all(len(f) == 5 for f in frames)
    ats = [[f["at"] for f in fs] for fs in frames]
    common = set(ats[0]) & set(ats[1]) & set(ats[2])
    assert len(common) >= 3, ats  # the same frames, not one build per viewer
    builds = [f["feed"]["builds"] for f in frames[0]]
    spacing = [b - a for a, b in zip(ats[0], ats[0][1:], strict=False)]
    assert all(0.8 <= s <= 1.3 for s in spacing[1:]), spacing
    assert builds[-1] - builds[0] <= 5  # one build per second, whatever the number of viewers
    assert max(f["feed"]["viewers"] for f in frames[0]) >= 3


def test_counts_follow_mqtt_traffic_and_agree_with_the_reference(
        gw: DashboardGateway) -> None:
    before = gw.snapshot()["totals"]["in"]
    pub = Publisher(gw.mqtt_port, 200, client_id="dash-sensor").start()
    try:
        rates = []
        for f in sse_frames(gw.base, gw.read_token, 4):
            rates.append(f["rates"]["in"])
            clients = {c["client_id"]: c for c in f["clients"]["list"]}
        assert max(rates) > 100, rates  # ~200 msg/s shown while they flow
        assert clients["dash-sensor"]["protocol"] == "mqtt"
        assert clients["dash-sensor"]["messages"] > 0
        assert {"sensors/site1/dev0/temp", "sensors/site1/dev3/temp"} <= {
            t["topic"] for t in f["topics"]}
        assert f["rates"]["by_protocol"]["mqtt"] > 100
    finally:
        pub.stop()
    deadline = time.monotonic() + 10
    while True:  # traffic stopped: the dashboard's count and the reference's settle equal
        snap = gw.snapshot()
        where, ref = gw.reference_received()
        if snap["totals"]["in"] == ref and ref >= before + pub.sent:
            break
        assert time.monotonic() < deadline, (snap["totals"], where, ref, before, pub.sent)
        time.sleep(0.3)
    time.sleep(2.5)  # the client went away: its reason is counted
    reasons = gw.snapshot()["clients"]["disconnect_reasons"]
    assert sum(reasons.values()) >= 1, reasons
