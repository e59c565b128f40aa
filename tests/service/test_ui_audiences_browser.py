"""The inspector's audience tab in a real browser (Debian's chromium + chromium-driver, selenium).

A live service with API keys on and an audience index (tag-all-shaped rows from
batch/audience_synth.py, 1,780 tags, skewed popularity) in a private redis-server. The page must
show the index, build `interest:A AND NOT intention:B` from picked tags and operators, and show
exactly the size the API answers. The screenshot goes to $MVKE_UI_AUDIENCE_SCREENSHOT when set
(docs/ui-audiences.png is made that way), else to the test's tmp dir.
"""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

pytest.importorskip("pyroaring")

from batch.audience_synth import synth_parts  # noqa: E402
from batch.audiences import build_index, publish  # noqa: E402
from mvke.localredis import LocalRedis  # noqa: E402
from mvke.runtime.audience import AudienceRule  # noqa: E402
from mvke.runtime.keys import Keys  # noqa: E402
from tests.service.test_service import LiveService, make_settings  # noqa: E402
from tests.service.test_ui_browser import _browser  # noqa: E402

pytestmark = pytest.mark.integration
KEY = "ui-aud-key"


def test_audience_tab_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    driver = _browser()
    files, tags = synth_parts(tmp_path / "rows", 20_000, k=20, tasks=["interest", "intention"], seed=1)
    index = build_index(files, ["interest", "intention"], tags, AudienceRule(20), "3f2a9c1d0b7e4a65", {"demo": 1})
    with LocalRedis() as server:
        r = server.client()
        publish(index, r, Keys("uiaud"))
        try:
            with LiveService(make_settings(server.url, "uiaud", api_keys=KEY, audience_poll_s=0.05)) as s:
                wait = WebDriverWait(driver, 15)
                driver.get(f"{s.url}/ui")
                driver.find_element(By.ID, "tab-audiences").click()
                wait.until(lambda d: d.find_element(By.ID, "api-key").is_displayed())
                driver.find_element(By.ID, "api-key").send_keys(KEY)
                driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
                info = wait.until(lambda d: d.find_element(By.ID, "aud-info").get_attribute("data-version"))
                assert info == index.meta.version
                assert "20,000 users" in driver.find_element(By.ID, "aud-info").text

                first = driver.find_element(By.CSS_SELECTOR, "#aud-terms .aud-term")
                first.find_element(By.CSS_SELECTOR, ".tag-pick").send_keys(tags[2])
                assert first.find_element(By.CSS_SELECTOR, ".tag-size").text == \
                    f"{index.meta.sizes['interest'][2]:,} users"
                driver.find_element(By.ID, "aud-add").click()
                second = driver.find_elements(By.CSS_SELECTOR, "#aud-terms .aud-term")[1]
                Select(second.find_element(By.CSS_SELECTOR, ".op")).select_by_value("AND NOT")
                Select(second.find_element(By.CSS_SELECTOR, ".task-pick")).select_by_value("intention")
                second.find_element(By.CSS_SELECTOR, ".tag-pick").send_keys(tags[0])
                driver.find_element(By.ID, "aud-add").click()
                third = driver.find_elements(By.CSS_SELECTOR, "#aud-terms .aud-term")[2]
                Select(third.find_element(By.CSS_SELECTOR, ".op")).select_by_value("OR")
                third.find_element(By.CSS_SELECTOR, ".tag-pick").send_keys(tags[40])
                want_expr = f"interest:{tags[2]} AND NOT intention:{tags[0]} OR interest:{tags[40]}"
                assert driver.find_element(By.ID, "aud-expression").get_attribute("value") == want_expr
                driver.find_element(By.ID, "aud-estimate").click()
                size = wait.until(lambda d: d.find_element(By.ID, "aud-size").get_attribute("data-size"))
                api = httpx.post(f"{s.url}/audiences:estimate", json={"expression": want_expr},
                                 headers={"authorization": f"Bearer {KEY}"}).json()
                assert int(size) == api["size"] > 0
                shot = Path(os.environ.get("MVKE_UI_AUDIENCE_SCREENSHOT") or tmp_path / "ui-audiences.png")
                driver.save_screenshot(str(shot))

                # a typed expression with an error: the 422's message, naming the token and position
                box = driver.find_element(By.ID, "aud-expression")
                box.clear()
                box.send_keys(f"interest:{tags[2]} AND AND")
                driver.find_element(By.ID, "aud-estimate").click()
                err = wait.until(lambda d: d.find_element(By.ID, "aud-error").text)
                assert "422" in err and "'AND'" in err and "position" in err
        finally:
            driver.quit()
            r.close()
