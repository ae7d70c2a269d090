"""Take the README's screenshot of the page: the service on a model, three sample images and a rejected file.

Usage: .venv/bin/python scripts/screenshot.py [--model weights/model.onnx] [--out docs/screenshot.png]
Needs what the browser test needs (scripts/install-browser.sh).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SAMPLES = ("cellavision_020.png", "tecom_046.png", "cellavision_050.png")


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


def capture(url: str, out: Path) -> None:
    files = [{"name": name, "mimeType": "image/png", "buffer": (ROOT / "examples" / name).read_bytes()}
             for name in SAMPLES]
    files.append({"name": "notes.txt", "mimeType": "text/plain", "buffer": b"plate 3, smear 2"})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800}, locale="en-US")
        page.goto(url + "/")
        expect(page.locator("#service-state")).to_have_attribute("data-state", "ready")
        page.get_by_label("Pixel size").fill("0.1")
        page.locator("#file-input").set_input_files(files)
        for i in range(len(SAMPLES)):
            expect(page.locator("li.card img.overlay").nth(i)).to_be_visible(timeout=60_000)
        page.evaluate("document.activeElement.blur()")
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "weights" / "model.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "WBC_MODEL_PATH": str(args.model.resolve()), "WBC_API_KEY": "",
           "WBC_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.api.main:create_app", "--factory",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        capture(url, args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
