"""The dashboard in a real headless Chromium (Debian's ``chromium`` + ``chromedriver``,
driven with Selenium: the W3C WebDriver client the browser vendors maintain, talking to
the distribution's own chromedriver, so no browser or driver is downloaded at test time).

Against a real gateway (upstream: a real Mosquitto; intelligence on) fed by a paho-mqtt
publisher: a wrong token is refused, the numbers shown equal ``/metrics`` (or, where the
gateway has none, ``status.json``) and move with the traffic, the chart draws, every page
renders at desktop and phone sizes without sideways scrolling, and a screenshot of each is
saved (into ``$DASHBOARD_SCREENSHOTS`` when set, e.g. ``docs/img``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from .conftest import LOOPBACK, MosquittoBroker, _require_binary, _start_mosquitto
from .dashboard_helpers import V2, DashboardGateway, Publisher

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

from .browser_helpers import (  # noqa: E402
    CHROMEDRIVER,
    CHROMIUM,
    DESKTOP,
    frames,
    log_in,
    start_browser,
    wait_until,
)

PAGES = ["overview", "topics", "clients", "intelligence", "queue"]
PHONE = (390, 844)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    broker = _start_mosquitto(tmp_path_factory.mktemp("upstream"))
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory,
       upstream: MosquittoBroker) -> Iterator[DashboardGateway]:
    # pump-1 replays a backlog of readings at once: exempt from the flood watch, as a
    # backfilling device would be configured
    g = DashboardGateway(tmp_path_factory.mktemp("gw"), upstream.port, extra={
        "intelligence": {"enabled": True, "threat_exempt_clients": ["pump-*"]}})
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        _require_binary(binary)
    driver = start_browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("DASHBOARD_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _number(driver: WebDriver, element_id: str) -> float | None:
    text = driver.find_element(By.ID, element_id).text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def _next_frame(driver: WebDriver) -> None:
    n = frames(driver)
    wait_until("a snapshot", lambda: frames(driver) > n, 5)


def _readings(port: int, topic: str, values: list[float], t0: float) -> None:
    """``values`` on ``topic``, one a minute on the device's own clock, QoS 1, acknowledged."""
    c = mqtt.Client(V2, client_id="pump-1", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(50)  # the gateway allows 100
    c.connect(LOOPBACK, port)
    c.loop_start()
    try:
        infos = [c.publish(topic, json.dumps({"value": v, "ts": t0 + 60 * i}), qos=1)
                 for i, v in enumerate(values)]
        infos[-1].wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_a_wrong_token_is_refused(browser: WebDriver, gw: DashboardGateway) -> None:
    browser.delete_all_cookies()
    browser.get(gw.base + "/dashboard")
    assert browser.current_url.endswith("/dashboard/login")
    browser.find_element(By.ID, "token").send_keys("rmq_" + "x" * 43)
    browser.find_element(By.ID, "login").click()
    refused = wait_until("the refusal", lambda: browser.find_elements(By.ID, "refused"))
    assert "refused" in refused[0].text
    assert not browser.get_cookies()
    browser.get(gw.base + "/dashboard")  # still no way in
    assert browser.current_url.endswith("/dashboard/login")
    assert "rmq_" not in browser.current_url


def test_the_numbers_shown_are_the_gateways_and_move_with_traffic(
        browser: WebDriver, gw: DashboardGateway) -> None:
    log_in(browser, gw, gw.read_token)
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not for scripts
    pub = Publisher(gw.mqtt_port, 150, client_id="browser-sensor").start()
    try:
        wait_until("a rate above 75 msg/s", lambda: (_number(browser, "v-rate-in") or 0) > 75)
        first = _number(browser, "v-total-in")
        _next_frame(browser)
        _next_frame(browser)
        assert (_number(browser, "v-total-in") or 0) > (first or 0) + 100
        protocols = browser.find_element(By.ID, "t-protocols").text
        assert "mqtt" in protocols
    finally:
        pub.stop()

    def agree() -> bool:
        _next_frame(browser)
        shown = _number(browser, "v-total-in")
        where, ref = gw.reference_received()
        return shown == ref and _number(browser, "v-rate-in") == 0

    wait_until("the total to equal the reference", agree, 15)
    where, ref = gw.reference_received()
    assert ref >= pub.sent
    assert _number(browser, "v-clients") == gw.snapshot()["clients"]["connected"]


def test_the_chart_draws(browser: WebDriver, gw: DashboardGateway) -> None:
    log_in(browser, gw, gw.read_token)
    browser.execute_script("location.hash = '#overview'")
    pub = Publisher(gw.mqtt_port, 100, client_id="chart-sensor").start()
    try:
        for _ in range(3):
            _next_frame(browser)
    finally:
        pub.stop()
    painted = browser.execute_script("""
        const c = document.querySelector('#chart-rates canvas');
        if (!c || !c.width) return -1;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;""")
    assert painted > 500, painted  # axes, grid and the two series


def test_every_page_on_desktop_and_phone(browser: WebDriver, gw: DashboardGateway,
                                         shots: Path) -> None:
    log_in(browser, gw, gw.read_token)
    # one stream with an anomaly, so the intelligence page has an incident to show
    _readings(gw.mqtt_port, "sensors/site1/pump/pressure",
              [4.0 + 0.05 * ((i * 7) % 5) for i in range(330)] + [40.0, 41.0, 42.0],
              time.time() - 60 * 340)
    pub = Publisher(gw.mqtt_port, 120, client_id="sensor-7").start()
    expect = {"topics": "sensors", "clients": "sensor-7", "intelligence": "pump/pressure",
              "queue": "cloud", "overview": "cloud"}
    try:
        for size, label in ((DESKTOP, "desktop"), (PHONE, "phone")):
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": size[0], "height": size[1], "deviceScaleFactor": 1,
                "mobile": label == "phone"})
            for page in PAGES:
                browser.execute_script(f"location.hash = '#{page}'")
                _next_frame(browser)
                section = browser.find_element(By.ID, f"page-{page}")
                assert section.is_displayed()
                wait_until(f"{expect[page]!r} on {page}", lambda p=page, s=section:
                      expect[p] in s.text, 10)
                width = browser.execute_script("return document.documentElement.scrollWidth")
                assert width <= size[0], f"{page} is {width} px wide on a {label} ({size[0]})"
                if page in ("overview", "queue"):  # the chart follows the screen's width
                    chart = browser.execute_script(
                        f"return document.querySelector('#page-{page} canvas').clientWidth")
                    assert 0.6 * size[0] < chart <= size[0], (page, label, chart)
                path = shots / f"dashboard-{page}-{label}.png"
                browser.save_screenshot(str(path))
                assert path.stat().st_size > 5000
        # no script error, no Content-Security-Policy violation (the login's 401 is expected)
        errors = [e["message"] for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not errors, errors
    finally:
        pub.stop()
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if not os.environ.get("DASHBOARD_SCREENSHOTS"):
        shutil.rmtree(shots, ignore_errors=True)
