"""The documentation's dashboard picture: a headless Chromium screenshot of a running box.

    make demo KEEP=1      # in one terminal; drop more GeoTIFFs into .demo/box/inbox/
    .venv/bin/python demo/screenshot.py http://127.0.0.1:8780/ docs/img/dashboard.png

It waits for the scene list, selects the newest scene, clicks near its middle so that the
nearest cells show, and saves a 256-colour PNG. Needs Debian's ``chromium`` and
``chromium-driver`` and Selenium (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--driver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1180",
                "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(args.driver), options=options)
    try:
        driver.get(args.url)
        WebDriverWait(driver, 30).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scenes li")) >= 1)
        time.sleep(1.5)  # overlays and quicklooks load
        driver.find_elements(By.CSS_SELECTOR, "#scenes li")[0].click()
        time.sleep(1.5)
        x, y = driver.execute_script(
            "const s = state.scenes[0]; const [w, so, e, n] = s.bounds_wgs84;"
            "const p = map.latLngToContainerPoint([so + (n - so) * 0.55, w + (e - w) * 0.45]);"
            "return [p.x, p.y];")
        element = driver.find_element(By.ID, "map")
        ActionChains(driver).move_to_element_with_offset(
            element, int(x - element.size["width"] / 2), int(y - element.size["height"] / 2)
        ).click().perform()
        time.sleep(3)  # neighbours and their thumbnails
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    picture = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
