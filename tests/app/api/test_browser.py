"""The page at `GET /`, in a real browser: headless Chromium driven by Playwright, against the real service.

Needs Debian's `chromium` at /usr/bin/chromium and the `playwright` package (scripts/install-browser.sh);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live_server import serving
from support.service import encode, sample_rgb

from app.api.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("needs Debian's chromium at /usr/bin/chromium (run scripts/install-browser.sh)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="needs the playwright package (run scripts/install-browser.sh)")

# The machine allows no outside connections; these keep Chromium from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "tecom_046.png"
API_KEY = "browser-test-key"
PIXEL_SIZE_UM = 0.5


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def service(settings_for: Callable[..., Settings]) -> Iterator[str]:
    """The service with an API key configured, as a lab would run it."""
    with serving(settings_for(api_key=API_KEY)) as url:
        yield url


@pytest.fixture
def page(browser: Any, service: str) -> Iterator[Any]:
    """A fresh tab on the service's page, with the service seen as ready; fails on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True,
                                  locale="en-US")
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    tab.goto(service + "/")
    sync_api.expect(tab.locator("#service-state")).to_have_attribute("data-state", "ready")
    yield tab
    context.close()
    assert script_errors == []


def overlay_size(page: Any, filename: str) -> tuple[int, int]:
    """Wait for the overlay PNG of `filename` to load; its natural (width, height)."""
    image = page.locator("li.card", has_text=filename).locator("img.overlay")
    sync_api.expect(image).to_be_visible(timeout=20_000)
    image.evaluate("img => img.complete || new Promise((done) => img.addEventListener('load', done))")
    width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    return width, height


def drop(page: Any, name: str, data: bytes) -> None:
    """Drop a file on the drop zone, as a drag from the desktop would."""
    page.locator("#drop-zone").evaluate("""(zone, [name, bytes]) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
        zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, cancelable: true }));
    }""", [name, list(data)])


def number(text: str) -> float:
    return float(re.sub(r"[^0-9.]", "", text))


def test_page_segments_an_upload_shows_overlay_and_areas_and_downloads_the_csv(page: Any, service: str,
                                                                                  tmp_path: Path) -> None:
    expected = httpx.post(f"{service}/v1/segment", params={"pixel_size_um": PIXEL_SIZE_UM},
                          headers={"X-API-Key": API_KEY}, files={"file": (SAMPLE.name, SAMPLE.read_bytes())},
                          timeout=30).json()
    broken = encode(sample_rgb())[:300]

    page.get_by_label("API key").fill(API_KEY)
    page.get_by_label("Pixel size").fill(str(PIXEL_SIZE_UM))
    page.locator("#file-input").set_input_files([
        {"name": SAMPLE.name, "mimeType": "image/png", "buffer": SAMPLE.read_bytes()},
        {"name": "broken.png", "mimeType": "image/png", "buffer": broken}])

    assert overlay_size(page, SAMPLE.name) == (expected["width"], expected["height"])
    row = page.locator("#results-table tbody tr", has_text=SAMPLE.name)
    cells = row.locator("td").all_inner_texts()
    assert cells[0] == f"{expected['width']} × {expected['height']}"
    areas = expected["areas_px"]
    assert [number(c) for c in cells[1:4]] == [areas["nucleus"], areas["cytoplasm"], areas["cell"]]
    assert number(cells[6]) == pytest.approx(expected["areas_um2"]["cell"], abs=0.06)  # one decimal shown
    assert expected["areas_px"]["cell"] > 0
    card = page.locator("li.card", has_text=SAMPLE.name)
    assert number(card.locator("tr[data-region=nucleus] td.px").inner_text()) == areas["nucleus"]

    rejected = page.locator("#results-table tbody tr", has_text="broken.png")
    sync_api.expect(rejected).to_contain_text("Rejected")
    sync_api.expect(rejected).to_contain_text("corrupt or truncated")
    sync_api.expect(page.locator("#summary")).to_have_text("2 images · 1 segmented · 1 rejected")
    sync_api.expect(page.locator("#alert")).to_be_hidden()

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download masks and CSV (ZIP)").click()
    download = download_info.value
    assert download.suggested_filename.endswith(".zip")
    with zipfile.ZipFile(download.path()) as archive:
        names = set(archive.namelist())
        rows = {r["filename"]: r for r in csv.DictReader(io.StringIO(archive.read("results.csv").decode()))}
    assert {"tecom_046_mask.png", "tecom_046_overlay.png", "results.json"} <= names
    assert int(rows[SAMPLE.name]["area_nucleus_px"]) == expected["areas_px"]["nucleus"]
    assert float(rows[SAMPLE.name]["area_cell_um2"]) == pytest.approx(expected["areas_um2"]["cell"])
    assert rows["broken.png"]["error"].startswith("422")

    # A new pixel size re-measures; the overlay already shown stays.
    overlay_src = card.locator("img.overlay").get_attribute("src")
    page.get_by_label("Pixel size").fill("1")
    page.get_by_label("Pixel size").press("Tab")
    sync_api.expect(row.locator("td").nth(6)).to_have_text(f"{expected['areas_px']['cell']:,}.0")
    assert card.locator("img.overlay").get_attribute("src") == overlay_src


def test_page_takes_a_dropped_file_and_asks_for_the_api_key_when_refused(page: Any) -> None:
    drop(page, SAMPLE.name, SAMPLE.read_bytes())

    alert = page.locator("#alert")
    sync_api.expect(alert).to_be_visible()
    sync_api.expect(alert).to_contain_text("API key")
    sync_api.expect(page.get_by_label("API key")).to_be_focused()

    page.get_by_label("API key").fill(API_KEY)
    page.get_by_role("button", name="Segment again").click()
    assert overlay_size(page, SAMPLE.name)[0] > 0
    sync_api.expect(alert).to_be_hidden()

    page.reload()  # the key stays for the rest of the session, in this tab only
    sync_api.expect(page.get_by_label("API key")).to_have_value(API_KEY)


def test_page_is_usable_by_keyboard_with_labelled_controls(page: Any) -> None:
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file-input":
            break
    assert page.evaluate("document.activeElement.id") == "file-input"
    assert page.locator("#drop-zone").evaluate("el => getComputedStyle(el).outlineStyle") == "solid"
    assert page.get_by_label("Drop images here, or choose files").count() == 1
    assert page.locator("#status").get_attribute("aria-live") == "polite"
    assert page.locator("#results-table caption").count() == 1
    assert page.locator("#results-table thead th[scope=col]").count() == 9
