"""The web page at `/` in a real headless browser: Chromium and its driver from the OS packages (.ci/run installs
them), driven by Selenium, against `trt-nuwaxl serve`'s app on uvicorn (tiny preset, CPU). The page loads, a job
runs, frames appear as they become final, and the mp4 downloads."""

import os
import shutil
import time
from pathlib import Path

import pytest

from nuwaxl.runtime.pipeline import Pipeline

BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
MISSING = "Chromium and chromedriver from the OS packages (apt-get install chromium chromium-driver; .ci/run does it)"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (BROWSER and DRIVER):
        if os.environ.get("CI"):  # CI installs them: a skip there would hide a broken page
            pytest.fail(f"needs {MISSING}")
        pytest.skip(f"needs {MISSING}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver, downloads
    driver.quit()


def test_the_page_runs_a_job_shows_its_frames_and_downloads_the_mp4(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from benchmarks.serve_load import serve

    driver, downloads = browser
    _, url, stop = serve(Pipeline.from_preset("tiny", seed=0, device="cpu"), tmp_path, max_active=1, max_queue=4)
    try:
        driver.get(url + "/")
        assert driver.title == "trt-nuwaxl"
        frames = driver.find_element(By.ID, "frames")
        frames.clear()
        frames.send_keys("22")
        driver.find_element(By.ID, "steps").send_keys("3")
        driver.find_element(By.ID, "go").click()
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strip img"))  # the first frame arrived
        assert driver.find_element(By.ID, "ttff").text.endswith(" s")
        link = wait.until(lambda d: d.find_element(By.ID, "download") if d.find_element(By.ID, "download")
                          .is_displayed() else None)
        shown = driver.find_elements(By.CSS_SELECTOR, "#strip img")
        assert len(shown) == 22
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                   for img in shown)  # every frame's PNG loaded
        assert "done" in driver.find_element(By.ID, "status").text
        link.click()
        end = time.time() + 60
        while not (got := [p for p in Path(downloads).glob("*.mp4")]) and time.time() < end:
            time.sleep(0.2)  # Chromium writes *.crdownload first, then renames
        assert got, f"no mp4 in {list(Path(downloads).iterdir())}"
        assert got[0].read_bytes()[4:8] == b"ftyp"  # an MP4 file
    finally:
        stop()
