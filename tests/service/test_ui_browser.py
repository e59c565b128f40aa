"""GET /ui in a real browser: Debian's chromium + chromium-driver, driven by selenium.

A live service (uvicorn, ONNX Runtime, private redis-server) with API keys on, an active
version and a canary. The page must ask for the key (and keep it in memory only), look up
a user, render exactly the tags and scores the API answers, show a chosen tag's gate
weights from `explain`, and list the versions with their roles. The screenshot goes to
the test's tmp dir, or to $MVKE_UI_SCREENSHOT (docs/ui-inspector.png is made that way).

Skipped, saying why, only where chromium / chromedriver / selenium are not installed
(.ci/run installs them with apt as root).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from mvke.runtime.keys import Keys
from model_export.feature_store import load_dataset_users
from model_export.publish import publish
from tests.export.test_publish import make_variant
from tests.service.test_service import LiveService, make_settings, user_ids

KEY = "ui-test-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)


def _browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does it as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1180", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)   # no selenium-manager download


@pytest.fixture(scope="module")
def ui_service(private_redis_module, bundle, dataset_dir, tmp_path_factory):
    r = private_redis_module.client()
    keys = Keys("ui")
    active = publish(bundle("mvke-mt"), r, keys=keys)["version"]
    canary = publish(make_variant(bundle("mvke-mt"), tmp_path_factory.mktemp("ui") / "b", 1), r, keys=keys,
                     canary_percent=25)["version"]
    load_dataset_users(dataset_dir("synthetic"), r, keys=keys, progress=False)
    with LiveService(make_settings(private_redis_module.url, "ui", api_keys=KEY)) as s:
        auth = {"authorization": f"Bearer {KEY}"}
        import time
        deadline = time.monotonic() + 10
        while s.client.get("/readyz").json().get("canary_version") != canary and time.monotonic() < deadline:
            time.sleep(0.05)
        yield s, auth, active, canary
    r.close()


@pytest.fixture(scope="module")
def private_redis_module():
    from mvke.localredis import LocalRedis
    server = LocalRedis().start()
    yield server
    server.stop()


def test_inspector_page_in_chromium(ui_service, dataset_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    s, auth, active, canary = ui_service
    user = user_ids(dataset_dir("synthetic"), 1, seed=11)[0]
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 15)
        driver.get(f"{s.url}/ui")
        # keys are on: the page asks for one (its first API call got a 401)
        wait.until(ec.visibility_of_element_located((By.ID, "api-key"))).send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(ec.invisibility_of_element_located((By.ID, "key-bar")))

        # issue 28 §6: the placeholders are a user of the feature store and the served model's own fields
        data = dataset_dir("synthetic")
        first_user = str(pq.read_table(data / "users.parquet", columns=["user_id"]).column(0)[0])
        wait.until(lambda d: d.find_element(By.ID, "user-id").get_attribute("placeholder") == first_user)
        placeholder = json.loads(driver.find_element(By.ID, "features").get_attribute("placeholder"))
        assert placeholder and set(placeholder) <= set(json.loads((data / "meta.json").read_text())["fields"])

        field = driver.find_element(By.ID, "top-k")
        field.clear()
        field.send_keys("8")
        driver.find_element(By.ID, "user-id").send_keys(user)
        driver.find_element(By.ID, "lookup").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".task .tag-row"))

        api = httpx.post(f"{s.url}/users/{user}/tags", json={"top_k": 8, "explain": True}, headers=auth).json()
        rendered = {col.get_attribute("data-task"): [(row.get_attribute("data-tag"), float(row.get_attribute("data-score")))
                                                       for row in col.find_elements(By.CSS_SELECTOR, ".tag-row")]
                    for col in driver.find_elements(By.CSS_SELECTOR, ".task")}
        assert list(rendered) == list(api["tasks"])
        for task, ranked in api["tasks"].items():
            assert [t for t, _ in rendered[task]] == [x["tag"] for x in ranked]
            assert all(abs(got - x["score"]) <= 1e-6 for (_, got), x in zip(rendered[task], ranked))
            bars = [b.get_attribute("style") for b in driver.find_elements(
                By.CSS_SELECTOR, f".task[data-task='{task}'] .tag-row .fill")]
            assert bars[0] == f"width: {100 * ranked[0]['score']:.1f}%;"
        meta = driver.find_element(By.ID, "meta")
        assert meta.get_attribute("data-version") == api["model_version"] in (active, canary)
        assert meta.get_attribute("data-source") == "store" and api["model_version"] in meta.text

        # the explanation of the third intention tag: its gate weights over the experts
        chosen = driver.find_elements(By.CSS_SELECTOR, ".task[data-task='intention'] .tag-row")[2]
        chosen.click()
        panel = wait.until(ec.visibility_of_element_located((By.ID, "explain")))
        want = api["tasks"]["intention"][2]
        assert panel.get_attribute("data-tag") == want["tag"] and panel.get_attribute("data-task") == "intention"
        experts = panel.find_elements(By.CSS_SELECTOR, "tr.expert")
        assert [int(e.get_attribute("data-expert")) for e in experts] == want["explain"]["experts"]
        assert [float(e.get_attribute("data-gate")) for e in experts] == pytest.approx(want["explain"]["gates"], abs=1e-9)
        assert [float(e.get_attribute("data-contribution")) for e in experts] == \
            pytest.approx(want["explain"]["contributions"], abs=1e-6)
        screenshot = tmp_path / "ui-inspector.png"
        driver.save_screenshot(str(screenshot))

        # the key lives in memory only: nothing in storage, cookies or the URL
        assert driver.execute_script("return localStorage.length + sessionStorage.length") == 0
        assert driver.get_cookies() == [] and KEY not in driver.current_url

        # pasted feature values for a user the store does not know
        driver.find_element(By.ID, "user-id").clear()
        driver.find_element(By.ID, "features").send_keys('{"age_bucket": "age3", "clicked_tags": ["t-typo"]}')
        driver.find_element(By.ID, "lookup").click()
        wait.until(lambda d: d.find_element(By.ID, "meta").get_attribute("data-source") == "request")
        assert "clicked_tags: 1" in driver.find_element(By.ID, "unknown").text

        # the versions tab: which version is active, which is the canary
        driver.find_element(By.ID, "tab-versions").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#versions-table tbody tr")) == 2)
        states = {row.get_attribute("data-version"): row.get_attribute("data-state")
                  for row in driver.find_elements(By.CSS_SELECTOR, "#versions-table tbody tr")}
        assert states == {active: "active", canary: "canary"}
        assert "25" in driver.find_element(By.ID, "versions-summary").text
        driver.save_screenshot(str(tmp_path / "ui-versions.png"))
    finally:
        driver.quit()
    assert screenshot.stat().st_size > 10_000
    target = os.environ.get("MVKE_UI_SCREENSHOT")
    if target:
        shutil.copy(screenshot, target)
        shutil.copy(tmp_path / "ui-versions.png", Path(target).with_name(Path(target).stem + "-versions.png"))
