"""The page's security headers, no redirect built from the Host header, escaped text logs."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from app.api.observability import EscapingFormatter


def test_the_page_and_its_assets_forbid_inline_script_framing_and_sniffing(client: TestClient) -> None:
    for path in ("/", "/static/app.js"):
        response = client.get(path)
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"


def test_api_answers_are_not_sniffed(client: TestClient) -> None:
    assert client.get("/health/live").headers["x-content-type-options"] == "nosniff"


def test_no_redirect_echoes_the_clients_host(client: TestClient) -> None:
    response = client.get("/static", headers={"Host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "evil.example" not in response.headers.get("location", "")


def test_text_logs_escape_control_characters_so_no_line_is_forged() -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "GET %s 200", ("/a\nFAKE ERROR\x1b[31m",),
                               None)
    line = EscapingFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line == "INFO GET /a\\nFAKE ERROR\\x1b[31m 200"
