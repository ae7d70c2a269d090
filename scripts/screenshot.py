"""Take the README's screenshots of the page, with the service on a model:

- `docs/screenshot.png`: three sample crops and a rejected file;
- `docs/screenshot-field.png`: one field of view with several leukocytes, each outlined, numbered and
  measured on its own. The field is a mosaic of the sample crops in `examples/` (CellaVision 020 and 050,
  and 020 again, turned a quarter and cut by the right edge), blended into the smear's background colour.

Usage: .venv/bin/python scripts/screenshot.py [--model weights/model.onnx] [--out docs/screenshot.png]
                                              [--field-out docs/screenshot-field.png]
Needs what the browser test needs (scripts/install-browser.sh).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import Browser, FilePayload, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SAMPLES = ("cellavision_020.png", "tecom_046.png", "cellavision_050.png")
PIXEL_SIZE_UM = "0.1"
FIELD_SIZE = (500, 800)  # height, width
#: (crop, quarter turns, centre x, centre y) of each leukocyte of the field; the last one is cut by the edge.
FIELD_CROPS = (("cellavision_020.png", 0, 180, 200), ("cellavision_050.png", 0, 520, 300),
               ("cellavision_020.png", 1, 790, 95))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, server: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the service stopped while starting")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


def field_of_view() -> bytes:
    """A PNG of FIELD_SIZE: the FIELD_CROPS, each faded out towards its corners into the background colour
    of the crops' edges, so that the field reads as one smear."""
    crops = {}
    for name in dict.fromkeys(c[0] for c in FIELD_CROPS):
        with Image.open(ROOT / "examples" / name) as crop_image:
            crops[name] = np.asarray(crop_image.convert("RGB"), np.float32)
    background = np.median(np.concatenate([np.concatenate([c[:8], c[-8:]]).reshape(-1, 3)
                                           for c in crops.values()]), axis=0)
    height, width = FIELD_SIZE
    pad = max(c.shape[0] for c in crops.values())  # crops may reach past the edge; the padding is cut off
    field = np.empty((height + 2 * pad, width + 2 * pad, 3), np.float32)
    field[:] = background
    for name, turns, cx, cy in FIELD_CROPS:
        crop = np.rot90(crops[name], turns)
        h, w = crop.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w]
        radius = np.hypot((xs - w / 2) / (w / 2), (ys - h / 2) / (h / 2))
        alpha = np.clip((1 - radius) / 0.35, 0, 1)[..., None]
        y0, x0 = pad + cy - h // 2, pad + cx - w // 2
        region = field[y0:y0 + h, x0:x0 + w]
        region[:] = region * (1 - alpha) + crop * alpha
    image = Image.fromarray(field[pad:pad + height, pad:pad + width].round().clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def segment_and_shoot(browser: Browser, url: str, files: list[FilePayload], overlays: int,
                      out: Path) -> None:
    """On a fresh page: upload `files` with the pixel size filled in, wait for `overlays` overlays, shoot
    the whole page."""
    page = browser.new_page(viewport={"width": 1280, "height": 800}, locale="en-US")
    page.goto(url + "/")
    expect(page.locator("#service-state")).to_have_attribute("data-state", "ready")
    page.get_by_label("Pixel size").fill(PIXEL_SIZE_UM)
    page.locator("#file-input").set_input_files(files)
    for i in range(overlays):
        overlay = page.locator("li.card img.overlay").nth(i)
        expect(overlay).to_be_visible(timeout=60_000)
        overlay.evaluate("img => img.complete || new Promise((done) => img.addEventListener('load', done))")
    expect(page.locator("#results")).to_have_attribute("aria-busy", "false", timeout=60_000)
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(out), full_page=True)
    page.close()


def capture(url: str, out: Path, field_out: Path) -> None:
    files: list[FilePayload] = [
        {"name": name, "mimeType": "image/png", "buffer": (ROOT / "examples" / name).read_bytes()}
        for name in SAMPLES]
    files.append({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"plate 3, smear 2"})
    field: list[FilePayload] = [
        {"name": "field_of_view.png", "mimeType": "image/png", "buffer": field_of_view()}]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        segment_and_shoot(browser, url, files, len(SAMPLES), out)
        segment_and_shoot(browser, url, field, 1, field_out)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "weights" / "model.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--field-out", type=Path, default=ROOT / "docs" / "screenshot-field.png")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "WBC_MODEL_PATH": str(args.model.resolve()), "WBC_API_KEY": "",
           "WBC_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        capture(url, args.out, args.field_out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out} and {args.field_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
