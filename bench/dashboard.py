"""What open dashboards cost the gateway (issue 15): its CPU with 0 and with 5 dashboards
open, at 1,000 msg/s of MQTT traffic, in the same invocation.

Method: one gateway subprocess (``[http]`` with the dashboard, forwarding to a real
Mosquitto upstream, the intelligence runtime on, the publisher exempt from the flood watch),
one paho-mqtt publisher at ``--rate`` msg/s QoS 1 on 4 topics for the whole run. Then
``--rounds`` rounds of two phases of ``--seconds`` each, alternating which goes first: no
dashboard open (the reference) and ``--viewers`` dashboards open (Server-Sent Events
clients on ``/dashboard/events``, each reading every snapshot, as a browser tab's
EventSource does; with ``--browsers``, real tabs of one headless Chromium logged in to the
dashboard, the first one in front). The gateway's CPU is read from ``/proc/<pid>/stat``
(utime + stime) at each phase's start and end. Prints one JSON document: CPU % of one
core per phase, the medians side by side, the difference, the rate the gateway received,
frames each viewer got, and the load average before and after.

    python3 bench/dashboard.py [--rate 1000] [--viewers 5] [--seconds 20] [--rounds 3]
                               [--browsers]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import _start_mosquitto  # noqa: E402
from tests.dashboard_helpers import DashboardGateway, Publisher  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/<pid>/stat`` fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Viewer(threading.Thread):
    """One open dashboard: an SSE client reading every snapshot until closed."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.token = token
        self.frames = 0
        self.bytes = 0
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            self.conn.request("GET", "/dashboard/events",
                              headers={"Authorization": f"Bearer {self.token}"})
            resp = self.conn.getresponse()
            self.ready.set()
            while True:
                line = resp.readline()
                if not line:
                    return
                self.bytes += len(line)
                if line.startswith(b"data: "):
                    self.frames += 1
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            return  # closed under the reader by close()
        finally:
            self.ready.set()

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)
        self.conn.close()
        self.join(timeout=5)


class Tabs:
    """``n`` tabs of one headless Chromium on the dashboard (Debian's chromium and
    chromedriver, as tests/test_dashboard_browser.py drives them)."""

    def __init__(self, gw: DashboardGateway, profile: Path) -> None:
        from tests.browser_helpers import log_in, start_browser

        self.gw = gw
        self.driver = start_browser(profile)
        log_in(self.driver, gw, gw.read_token)
        self.home = self.driver.current_window_handle
        self.driver.get("about:blank")

    def open(self, n: int) -> None:
        for i in range(n):
            if i:
                self.driver.switch_to.new_window("tab")
            self.driver.get(self.gw.base + "/dashboard")
        self.driver.switch_to.window(self.home)  # the first tab in front, as a person has it

    def frames(self) -> list[int]:
        out = []
        for h in self.driver.window_handles:
            self.driver.switch_to.window(h)
            out.append(int(self.driver.execute_script(
                "return Number(document.body && document.body.dataset.frames || 0)")))
        self.driver.switch_to.window(self.home)
        return out

    def close_all(self) -> None:
        for h in self.driver.window_handles:
            if h != self.home:
                self.driver.switch_to.window(h)
                self.driver.close()
        self.driver.switch_to.window(self.home)
        self.driver.get("about:blank")

    def quit(self) -> None:
        self.driver.quit()


def phase(gw: DashboardGateway, viewers: int, seconds: float,
          tabs: Tabs | None = None) -> dict[str, Any]:
    """CPU % of one core and messages/s over ``seconds`` with ``viewers`` dashboards open."""
    open_ = [Viewer(gw.http_port, gw.read_token) for _ in range(viewers if tabs is None else 0)]
    for v in open_:
        v.start()
    for v in open_:
        v.ready.wait(5)
    if tabs is not None and viewers:
        tabs.open(viewers)
    time.sleep(1.5)  # the feed notices its viewers; the first frame is out
    received0 = gw.snapshot()["totals"]["in"] if not viewers else None
    c0, t0 = cpu_seconds(gw.pid), time.monotonic()
    frames0 = [v.frames for v in open_]
    time.sleep(seconds)
    c1, t1 = cpu_seconds(gw.pid), time.monotonic()
    frames = [v.frames - f for v, f in zip(open_, frames0, strict=True)]
    sent = sum(v.bytes for v in open_)
    for v in open_:
        v.close()
    if tabs is not None and viewers:
        frames = tabs.frames()  # since each tab opened (~1.5 s before the phase)
        tabs.close_all()
    out: dict[str, Any] = {"viewers": viewers, "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 2),
                           "seconds": round(t1 - t0, 2)}
    if viewers:
        out["frames_per_viewer"] = frames
        if tabs is None:
            out["sse_bytes_total"] = sent
    if received0 is not None:
        out["received_per_s"] = round((gw.snapshot()["totals"]["in"] - received0)
                                      / (time.monotonic() - t0), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--viewers", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--browsers", action="store_true",
                    help="the dashboards are headless Chromium tabs, not SSE clients")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp_dir:
        tmp = Path(tmp_dir)
        upstream = _start_mosquitto(tmp)
        gw = DashboardGateway(tmp / "gw", upstream.port, extra={
            "intelligence": {"enabled": True, "threat_exempt_clients": ["bench-*"]}})
        gw.start()
        pub = Publisher(gw.mqtt_port, args.rate, client_id="bench-publisher").start()
        phases: list[dict[str, Any]] = []
        tabs = Tabs(gw, tmp / "chromium-profile") if args.browsers else None
        try:
            time.sleep(args.warmup)
            for r in range(args.rounds):
                order = (0, args.viewers) if r % 2 == 0 else (args.viewers, 0)
                for n in order:
                    phases.append({"round": r, **phase(gw, n, args.seconds, tabs)})
                    print(json.dumps(phases[-1]), file=sys.stderr)
            snap = gw.snapshot()
        finally:
            if tabs is not None:
                tabs.quit()
            pub.stop()
            gw.stop()
            upstream.stop()
    ref = [p["cpu_pct"] for p in phases if p["viewers"] == 0]
    dash = [p["cpu_pct"] for p in phases if p["viewers"]]
    rates = [p["received_per_s"] for p in phases if "received_per_s" in p]
    result = {
        "bench": "dashboard",
        "traffic": {"rate_target": args.rate, "received_per_s_median": statistics.median(rates),
                    "qos": 1, "topics": 4, "upstream": "mosquitto", "intelligence": True},
        "viewers": args.viewers,
        "viewer_kind": "chromium tabs" if args.browsers else "SSE clients",
        "phase_seconds": args.seconds,
        "rounds": args.rounds,
        "cpu_pct_of_one_core": {
            "reference_0_dashboards_median": round(statistics.median(ref), 2),
            f"with_{args.viewers}_dashboards_median": round(statistics.median(dash), 2),
            "added_median": round(statistics.median(dash) - statistics.median(ref), 2),
            "reference_runs": ref,
            "dashboard_runs": dash,
        },
        "target_added_pct": 2.0,
        "snapshot_bytes": len(json.dumps(snap, separators=(",", ":"))),
        "snapshot_build_ms_mean": snap["feed"]["build_ms_mean"],
        "snapshot_builds": snap["feed"]["builds"],
        "phases": phases,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
