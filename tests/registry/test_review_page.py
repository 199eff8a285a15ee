"""The review page end to end in headless Chromium (Debian's chromium + chromium-driver, through Selenium):
reject two prototypes, start a revision of a tiny ProtoPNet, promote the candidate, see /predict answer with it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_live_switch import registry_service

# On SQLite only (slow; the browser flow: the store is the one tested on both engines elsewhere)
pytestmark = [pytest.mark.slow, pytest.mark.registry_engines("sqlite")]

KEY = "page-key"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "review_page"


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian chromium and chromium-driver are not installed (make review-browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the element is being re-rendered
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def choose_mode(browser, mode: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "mode")).select_by_visible_text(mode)


def test_reject_revise_promote_in_the_browser(protopnet_registry, mnist_root, tmp_path, browser):
    from selenium.webdriver.common.by import By

    registry = protopnet_registry
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--registry", str(registry.root),
                               "--data-root", str(mnist_root), "--poll", "0.5"], stdout=worker_log,
                              stderr=subprocess.STDOUT)
    try:
        with registry_service(registry, tmp_path / "serve.log", PROTOSERVE_ADMIN_KEY=KEY) as url:
            browser.get(f"{url}/review/")
            wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".card"), 30, "the gallery")
            browser.find_element(By.ID, "key").send_keys(KEY)
            browser.find_element(By.ID, "save-key").click()
            for pid in (0, 1):
                browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{pid}"] button.reject').click()
                wait_for(lambda pid=pid: browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{pid}"]')
                         .get_attribute("data-verdict-state") == "reject", 10, f"prototype {pid} rejected")
            assert browser.find_element(By.ID, "open-count").text == "2"
            # the version's held-out non-digit drawings flagged (manifest domain.outliers), under its accuracy
            accuracy = browser.find_elements(By.CSS_SELECTOR, "#versions tr td")[2].text
            assert re.search(r"non-digits flagged \d+\.\d\d% \(FPR95 \d\.\d{3}\)", accuracy), accuracy
            choose_mode(browser, "mask")  # one round without training: the training options are off
            assert not browser.find_element(By.ID, "rounds").is_enabled()
            assert not browser.find_element(By.ID, "train-encoder").is_enabled()
            choose_mode(browser, "revise")
            assert browser.find_element(By.ID, "rounds").is_enabled()
            assert browser.find_element(By.ID, "train-subset").get_attribute("min") == "10"  # one image a class
            browser.save_screenshot(str(SCREENSHOTS / "1_rejected.png"))
            browser.find_element(By.ID, "start-revision").click()
            candidate = wait_for(lambda: browser.find_element(By.ID, "candidate").text, 240, "the candidate")
            browser.save_screenshot(str(SCREENSHOTS / "2_candidate.png"))
            browser.find_element(By.ID, "promote-candidate").click()
            wait_for(lambda: browser.find_element(By.ID, "active-version").text == candidate, 30, "the promotion")
            browser.set_window_size(390, 844)  # a phone
            browser.save_screenshot(str(SCREENSHOTS / "3_promoted_phone.png"))
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            cards = browser.find_elements(By.CSS_SELECTOR, ".card")
            assert cards[0].rect["width"] >= 120  # two cards a row, not squeezed
            assert browser.find_element(By.ID, "shown-version").text.endswith(candidate)
            with np.load(Path(registry.store.version(candidate).bundle) / "probe.npz") as probe:
                images = probe["input.image"][:1].tolist()
            answered = wait_for(lambda: all(httpx.post(f"{url}/predict", json={"images": images})
                                            .json()["model"]["version"] == candidate for _ in range(6)),
                                5, "/predict answering with the candidate")
            assert answered
    finally:
        worker.terminate()
        worker.wait(30)
        worker_log.close()
    assert registry.store.active().version == candidate and registry.store.active().previous == "0.1.0"
    assert {v["prototype_id"] for v in registry.store.version(candidate).lineage["verdicts"]} == {0, 1}
