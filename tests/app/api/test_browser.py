"""The page at `GET /`, in a real browser: headless Chromium driven by Playwright, against the real service
(the tiny test model, or the shipped one where the page must find real cells on a field of view).

Needs Debian's `chromium` at /usr/bin/chromium and the `playwright` package (scripts/install-browser.sh);
Playwright's own browser download is never used.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from support.live_server import serving
from support.service import encode, sample_rgb

from app.api.settings import Settings
from model_training.synthetic import THREE_CELLS, make_field

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("needs Debian's chromium at /usr/bin/chromium (run scripts/install-browser.sh)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="needs the playwright package (run scripts/install-browser.sh)")

# The machine allows no outside connections; these keep Chromium from trying.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "examples" / "tecom_046.png"
SHIPPED = REPO / "weights" / "model.onnx"
API_KEY = "browser-test-key"
PIXEL_SIZE_UM = 0.5
FILE_PIXEL_SIZE_UM = 0.25


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
def shipped_service(settings_for: Callable[..., Settings]) -> Iterator[str]:
    """The service on the shipped model, without an API key: it finds real cells on a field of view."""
    if not SHIPPED.is_file():
        pytest.skip("weights/model.onnx is not there yet")
    with serving(settings_for(model_path=SHIPPED)) as url:
        yield url


@contextmanager
def opened(browser: Any, url: str) -> Iterator[Any]:
    """A fresh tab on the service's page, with the service seen as ready; fails on any script error and on
    anything the page's Content-Security-Policy refused (all script in app.js, no inline style)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True,
                                  locale="en-US")
    tab = context.new_page()
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    tab.on("console", lambda message: script_errors.append(message.text)
           if "Content Security Policy" in message.text else None)
    tab.goto(url + "/")
    sync_api.expect(tab.locator("#service-state")).to_have_attribute("data-state", "ready")
    yield tab
    context.close()
    assert script_errors == []


@pytest.fixture
def page(browser: Any, service: str) -> Iterator[Any]:
    with opened(browser, service) as tab:
        yield tab


@pytest.fixture
def shipped_page(browser: Any, shipped_service: str) -> Iterator[Any]:
    with opened(browser, shipped_service) as tab:
        yield tab


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
    assert number(cells[1]) == expected["cell_count"]
    areas = expected["areas_px"]
    assert [number(c) for c in cells[2:5]] == [areas["nucleus"], areas["cytoplasm"], areas["cell"]]
    assert number(cells[7]) == pytest.approx(expected["areas_um2"]["cell"], abs=0.06)  # one decimal shown
    assert expected["areas_px"]["cell"] > 0
    card = page.locator("li.card", has_text=SAMPLE.name)
    assert expected["cells"], "the tiny model finds a cell in the sample"
    for cell in expected["cells"]:
        cell_row = card.locator(f"table.cells tbody tr[data-cell-id='{cell['id']}']")
        nucleus = cell_row.locator("td[data-area=nucleus_px]").inner_text()
        assert number(nucleus) == cell["areas_px"]["nucleus"]
        assert number(cell_row.locator("td[data-area=cell_um2]").inner_text()) == pytest.approx(
            cell["areas_um2"]["cell"], abs=0.06)
    sync_api.expect(card.locator(".scale-note")).to_contain_text(f"{PIXEL_SIZE_UM} µm per pixel, as entered")

    rejected = page.locator("#results-table tbody tr", has_text="broken.png")
    sync_api.expect(rejected).to_contain_text("Rejected")
    sync_api.expect(rejected).to_contain_text("corrupt or truncated")
    count = expected["cell_count"]
    sync_api.expect(page.locator("#summary")).to_have_text(
        f"2 images · 1 segmented · 1 rejected · {count} {'leukocyte' if count == 1 else 'leukocytes'}")
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
    sync_api.expect(row.locator("td").nth(7)).to_have_text(f"{expected['areas_px']['cell']:,}.0")
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
    assert page.locator("#results-table thead th[scope=col]").count() == 10
    assert page.get_by_label("Leukocyte diameter").count() == 1


def field_files() -> list[dict[str, Any]]:
    """A field of view with three leukocytes, one without any, and a crop in a TIFF that records its
    pixel size."""
    with_cells = encode(make_field(THREE_CELLS)[0])
    without = encode(make_field([], seed=3)[0])
    per_cm = 10_000 / FILE_PIXEL_SIZE_UM
    with Image.open(SAMPLE) as sample:
        calibrated = encode(sample.convert("RGB"), "TIFF", resolution_unit=3, x_resolution=per_cm,
                            y_resolution=per_cm)
    return [{"name": "field.png", "mimeType": "image/png", "buffer": with_cells},
            {"name": "empty.png", "mimeType": "image/png", "buffer": without},
            {"name": "calibrated.tif", "mimeType": "image/tiff", "buffer": calibrated}]


def test_page_lists_every_cell_of_a_field_and_downloads_cells_csv_and_geojson(shipped_page: Any,
                                                                                shipped_service: str) -> None:
    page, files = shipped_page, field_files()
    expected = {f["name"]: httpx.post(f"{shipped_service}/v1/segment",
                                      files={"file": (f["name"], f["buffer"])}, timeout=60).json()
                for f in files}
    field = expected["field.png"]
    assert field["cell_count"] == 3, "the shipped model finds the three leukocytes of the field"

    page.locator("#file-input").set_input_files(files)
    assert overlay_size(page, "field.png") == (640, 480)
    sync_api.expect(page.locator("#status")).to_contain_text("4 leukocytes found")
    sync_api.expect(page.locator("#summary")).to_have_text("3 images · 3 segmented · 4 leukocytes")

    # The summary row counts the cells; the card lists each, numbered as the service numbers them.
    summary = page.locator("#results-table tbody tr", has_text="field.png")
    assert number(summary.locator("td.count").inner_text()) == 3
    card = page.locator("li.card", has_text="field.png")
    sync_api.expect(card.locator(".cell-count")).to_have_text("3 leukocytes")
    rows = card.locator("table.cells tbody tr")
    assert rows.count() == 3
    for cell, row in zip(field["cells"], rows.all(), strict=True):
        assert row.locator("th[scope=row]").inner_text() == str(cell["id"])
        regions = ("nucleus", "cytoplasm", "cell")
        shown = [number(row.locator(f"td[data-area={r}_px]").inner_text()) for r in regions]
        assert shown == [cell["areas_px"][r] for r in regions]
        assert row.locator("td.nc").inner_text() == f"{cell['nc_ratio']:.2f}"
        assert row.locator("td.score").inner_text() == f"{cell['score']:.2f}"
        assert row.locator("td.edge").inner_text() == ("cut by edge" if cell["touches_border"] else "inside")
    assert card.locator("table.cells td[data-area=cell_um2]").count() == 0, "no pixel size, no µm²"
    assert card.locator(".badge").count() == 0, "no cell lies at the centre of the field"
    total = card.locator("table.cells tfoot tr")
    assert number(total.locator("td[data-area=cell_px]").inner_text()) == field["areas_px"]["cell"]
    sync_api.expect(card.locator(".scale-note")).to_have_text("No pixel size: areas in pixels only.")
    # Tables a screen reader can walk: a caption, every header cell scoped, cells grouped under their unit.
    table = card.locator("table.cells")
    assert table.locator("caption").inner_text() == "Leukocytes in field.png, numbered as in the overlay"
    assert table.locator("th:not([scope])").count() == 0
    assert table.locator("thead th[scope=colgroup]").inner_text() == "Area (px)"

    # A field without leukocytes says so, and offers no GeoJSON.
    empty = page.locator("li.card", has_text="empty.png")
    sync_api.expect(empty.locator(".no-cells")).to_have_text("No leukocyte found")
    assert empty.locator("table.cells").count() == 0 and empty.get_by_role("button").count() == 0
    assert expected["empty.png"]["cell_count"] == 0

    # The TIFF's own pixel size gives µm², and the page says where it came from; its cell is the primary one.
    tiff, tiff_card = expected["calibrated.tif"], page.locator("li.card", has_text="calibrated.tif")
    assert (tiff["pixel_size_um"], tiff["pixel_size_source"]) == (FILE_PIXEL_SIZE_UM, "file")
    sync_api.expect(tiff_card.locator(".scale-note")).to_contain_text(
        "0.25 µm per pixel, read from the image file")
    primary = tiff_card.locator("table.cells tbody tr.primary")
    sync_api.expect(primary.locator("th")).to_have_text(f"{tiff['primary_cell_id']}primary")
    primary_cell = next(c for c in tiff["cells"] if c["id"] == tiff["primary_cell_id"])
    assert number(primary.locator("td[data-area=cell_um2]").inner_text()) == pytest.approx(
        primary_cell["areas_um2"]["cell"], abs=0.06)

    # cells.csv, built in the page, is the batch ZIP's cells.csv to the byte.
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download cells.csv").click()
    download = download_info.value
    assert download.suggested_filename == "cells.csv"
    text = Path(download.path()).read_text(encoding="utf-8")
    rows_csv = list(csv.DictReader(io.StringIO(text)))
    assert [r["cell_id"] for r in rows_csv if r["filename"] == "field.png"] == ["1", "2", "3"]
    assert not [r for r in rows_csv if r["filename"] == "empty.png"]
    by_id = {int(r["cell_id"]): r for r in rows_csv if r["filename"] == "field.png"}
    for cell in field["cells"]:
        assert int(by_id[cell["id"]]["area_cell_px"]) == cell["areas_px"]["cell"]
    archive = httpx.post(f"{shipped_service}/v1/segment/batch", params={"format": "zip"},
                         files=[("files", (f["name"], f["buffer"])) for f in files], timeout=60)
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
        assert text == zipped.read("cells.csv").decode("utf-8")

    # The GeoJSON of one image: QuPath cell objects, numbered as in the table.
    with page.expect_download() as download_info:
        card.get_by_role("button", name="Download GeoJSON of field.png").click()
    download = download_info.value
    assert download.suggested_filename == "field.geojson"
    document = json.loads(Path(download.path()).read_text(encoding="utf-8"))
    assert document["type"] == "FeatureCollection"
    assert [f["properties"]["cell_id"] for f in document["features"]] == [1, 2, 3]
    sync_api.expect(page.locator("#status")).to_have_text("Downloaded the GeoJSON of field.png.")
    sync_api.expect(page.locator("#alert")).to_be_hidden()
