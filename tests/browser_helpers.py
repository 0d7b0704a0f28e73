"""Headless Chromium for the dashboard's browser test and bench/dashboard.py: Debian's
``chromium`` through Debian's ``chromedriver`` with Selenium (the W3C WebDriver client the
browser projects maintain; with the driver's path given, nothing is downloaded)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from .dashboard_helpers import DashboardGateway

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
DESKTOP = (1280, 860)


def browser_options(profile: Path) -> Any:
    """Headless Chromium as root, with a fresh profile in ``profile``."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    return opts


def start_browser(profile: Path) -> WebDriver:
    """A headless Chromium with a fresh profile (quit it when done)."""
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=browser_options(profile))
    driver.set_page_load_timeout(15)
    return driver


def wait_until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def frames(driver: WebDriver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.frames || 0)"))


def log_in(driver: WebDriver, gw: DashboardGateway, token: str) -> None:
    """Open the dashboard, logging in if needed (an open one is kept: its chart history)."""
    if urlsplit(driver.current_url).path == "/dashboard" and frames(driver) > 0:
        return
    driver.get(gw.base + "/dashboard")
    if driver.current_url.endswith("/dashboard/login"):
        box = driver.find_element(By.ID, "token")
        box.clear()
        box.send_keys(token)
        driver.find_element(By.ID, "login").click()
    wait_until("the dashboard", lambda: urlsplit(driver.current_url).path == "/dashboard"
          and frames(driver) > 0)
