"""The dashboard in a real headless Chromium against a real daemon.

The page loads without console errors; after a scene is processed the scene list and the
land-use overlay appear by themselves (live events); a click on the map lists the nearest
cells with thumbnails; a rollback from the page, with the token typed in, changes the model
the daemon runs. Screenshots are kept in the test's folder (and copied to
``$TERRATILE_SCREENSHOTS`` when set, which is how the documentation's picture is made).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.http.conftest import TOKEN, Box
from tests.helpers.scenes import quarters, write_scene

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is missing")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture()
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.fail("chromium and chromium-driver are not installed (make system-deps "
                    "installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def keep(driver: WebDriver, folder: Path, name: str) -> Path:
    path = folder / name
    driver.save_screenshot(str(path))
    target = os.environ.get("TERRATILE_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def loaded_images(driver: WebDriver, css: str) -> int:
    return int(driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".filter(i => i.complete && i.naturalWidth > 0).length", css))


def test_dashboard_follows_the_box_and_rolls_back(browser: WebDriver, box: Box,
                                                  tmp_path: Path) -> None:
    # the page re-renders its tables on every status message: an element found just before
    # a re-render is stale by the time its text is read, so the wait polls again
    wait = WebDriverWait(browser, 90, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,))
    browser.get(box.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "live").text == "● live")
    assert browser.find_element(By.ID, "state").text == "ready"
    assert "colour-test v2" in browser.find_element(By.ID, "status").text
    wait.until(lambda d: "v2 (running)" in d.find_element(By.CSS_SELECTOR, "tr.active").text)
    gate = browser.find_element(By.CSS_SELECTOR, "tr[data-version='2'] .gate-pass").text
    assert gate.startswith("passed") and "agreement_after 0.900" in gate
    assert browser.find_elements(By.CSS_SELECTOR, "#scenes li") == []
    keep(browser, tmp_path, "dashboard-empty.png")

    for name, size in (("quarters.tif", 128), ("big-quarters.tif", 192)):
        scene = write_scene(tmp_path / name, size=(size, size), layout=quarters(size, size))
        box.daemon.drop(scene)
        box.wait_done(1 if name == "quarters.tif" else 2)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scenes li")) == 2)
    items = browser.find_elements(By.CSS_SELECTOR, "#scenes li")
    assert "big-quarters.tif" in items[0].text and "quarters.tif" in items[1].text
    assert "urban 50 %" in items[0].text
    wait.until(lambda d: loaded_images(d, "img.leaflet-image-layer") >= 1)  # the land-use map
    wait.until(lambda d: loaded_images(d, "#scenes img") == 2)  # quicklooks
    assert browser.find_elements(By.CSS_SELECTOR, "#drift canvas")  # the drift chart
    assert "done / failed" in browser.find_element(By.ID, "status").text

    # a click in the urban (left) half of the selected scene: its nearest cells
    x, y = browser.execute_script(
        "const s = state.scenes[0]; const [w, so, e, n] = s.bounds_wgs84;"
        "const p = map.latLngToContainerPoint([n - (n - so) * 0.3, w + (e - w) * 0.2]);"
        "return [p.x, p.y];")
    element = browser.find_element(By.ID, "map")
    ActionChains(browser).move_to_element_with_offset(
        element, int(x - element.size["width"] / 2), int(y - element.size["height"] / 2)
    ).click().perform()
    wait.until(lambda d: loaded_images(d, "#neighbours img") == 8)
    captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#neighbours figcaption")]
    assert all(c.startswith("urban") for c in captions), captions
    keep(browser, tmp_path, "dashboard.png")

    # rollback: the token first, then the button; the daemon runs v1 after it
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "model-msg").text == "token set")
    wait.until(lambda d: d.find_element(By.ID, "live").text == "● live")
    browser.find_element(By.ID, "rollback").click()
    wait.until(lambda d: d.find_element(By.ID, "model-msg").text == "now running v1")
    wait.until(lambda d: "v1 (running)" in d.find_element(By.CSS_SELECTOR, "tr.active").text)
    wait.until(lambda d: "colour-test v1" in d.find_element(By.ID, "status").text)
    assert box.get("/api/status").json()["status"]["model"]["version"] == 1
    keep(browser, tmp_path, "dashboard-rolled-back.png")
    assert console_errors(browser) == []
