"""`dmmi serve` in a real headless browser: Debian's chromium driven through chromedriver.

Skipped (with the reason) when chromium, chromedriver or the selenium package is missing;
``.ci/run`` installs the browser. ``DMMI_UPDATE_SCREENSHOT=1`` also writes the final
screenshot to docs/web_demo.png; ``DMMI_SERVE_CHECKPOINT=CKPT`` serves that model instead of
a 1-step tiny one (a trained demo model makes the screenshot meaningful).
"""

import os
import pickle
import shutil
import time
from pathlib import Path

import pytest

from dmmi.data.synthetic import generate
from dmmi.inference import Predictor
from test_serve import make_tiny_checkpoint, running_server

pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (pip install -e '.[dev]')")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars", "--force-device-scale-factor=1"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web_demo.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = os.environ.get("DMMI_SERVE_CHECKPOINT")
    if not checkpoint:
        checkpoint, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("serve_browser"))
    with running_server(Predictor.load(checkpoint, device="cpu")) as url:
        yield url


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A synthetic image with one expression that refers to one object and one that refers to many."""
    root = tmp_path_factory.mktemp("scene")
    generate(root, n_images=6, seed=8, image_size=256, min_objects=3)
    refs = pickle.loads((root / "synthetic" / "refs(final).p").read_bytes())
    for name in sorted({r["file_name"] for r in refs}):
        mine = [r for r in refs if r["file_name"] == name]
        one = [r for r in mine if r.get("source") is None and not isinstance(r["ann_id"], list)]
        many = [r for r in mine if r.get("source") == "many"]
        if one and many:
            return root / "images" / name, one[0]["sentences"][0]["sent"], many[0]["sentences"][0]["sent"]
    raise AssertionError("no synthetic image with both a one- and a many-object expression")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # never a downloaded driver
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what, seconds=60):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {what} (page error line: {error!r})") from None


def _error_line(driver):
    line = driver.find_element(By.ID, "error")
    return line.text if line.is_displayed() else ""


def _segment(driver):
    driver.find_element(By.ID, "segment").click()


def _cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def _fill(driver, text):
    box = driver.find_element(By.ID, "texts")
    box.clear()
    box.send_keys(text)


def test_page_segments_an_uploaded_image(server, scene, browser, tmp_path):
    image, one_text, many_text = scene
    d = browser
    d.get(server)
    assert "dmmi" in d.title
    assert "zero" in d.find_element(By.CSS_SELECTOR, ".zom").text  # the zero / one / many note
    chips = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#chips .chip"), "the example chips")
    assert "px input" in d.find_element(By.ID, "model").text

    # errors are one readable line on the page
    _fill(d, "the red circle")
    _segment(d)
    assert "Choose an image first" in _wait(d, _error_line, "the no-image error")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    d.find_element(By.ID, "file").send_keys(str(bad))
    _segment(d)
    assert "cannot read 'broken.png'" in _wait(d, _error_line, "the server's not-an-image error")
    assert not _cards(d)

    # a real image, two expressions typed one per line -> two cards, in order
    d.find_element(By.ID, "file").send_keys(str(image))
    _wait(d, lambda d: d.find_element(By.ID, "preview").is_displayed(), "the image preview")
    _fill(d, f"{one_text}\n{many_text}")
    _segment(d)
    cards = _wait(d, lambda d: len(_cards(d)) == 2 and _cards(d), "two result cards")
    assert _error_line(d) == ""
    for card, text in zip(cards, [one_text, many_text]):
        assert card.find_element(By.CSS_SELECTOR, ".expr").text == f"\u201c{text}\u201d"
        badge = card.find_element(By.CSS_SELECTOR, ".badge").text
        assert badge == "no target" or (badge.startswith("foreground ") and badge.endswith("%"))
        img = card.find_element(By.CSS_SELECTOR, "img.overlay")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 256
        assert img.size["width"] > 100 and img.size["height"] > 100  # shown, not a broken icon
    assert "2 results for a 256\u00d7256 image" in d.find_element(By.ID, "status").text

    # an example chip adds its expression as a new line; three expressions -> three cards
    last = chips[-1]
    last.click()
    assert d.find_element(By.ID, "texts").get_attribute("value").split("\n")[-1] == last.text
    _segment(d)
    cards = _wait(d, lambda d: len(_cards(d)) == 3 and _cards(d), "three result cards")
    assert cards[2].find_element(By.CSS_SELECTOR, ".expr").text == f"\u201c{last.text}\u201d"
    d.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
    time.sleep(0.2)  # let the last images paint
    shot = tmp_path / "web_demo.png"
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("DMMI_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)

    # an empty expression list is refused on the page, the results stay
    _fill(d, "   \n  ")
    _segment(d)
    assert "Type at least one expression" in _wait(d, _error_line, "the empty-expression error")
    assert len(_cards(d)) == 3
