"""Settings from the environment, and the names the service gives files."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.api.settings import Settings, available_cpus
from app.engine.contract import metadata_path
from app.engine.report import client_filename, safe_stem, unique_stems


def test_settings_read_wbc_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WBC_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("WBC_API_KEY", "k3y-Value")
    monkeypatch.setenv("WBC_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("WBC_DEVICE", "cpu")
    settings = Settings()
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k3y-Value"
    assert settings.max_batch_size == 8
    assert settings.device == "cpu"
    assert "k3y-Value" not in repr(settings), "the key never shows in logs of the settings"


def test_an_empty_key_variable_switches_the_key_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WBC_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(("name", "value"), [("WBC_MAX_BATCH_SIZE", "0"), ("WBC_DEVICE", "tpu"),
                                             ("WBC_MAX_PIXELS", "-5")], ids=["batch-0", "device", "pixels"])
def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_defaults_find_the_model_under_the_working_directory(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.onnx").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.model_path == tmp_path / "weights" / "model.onnx"
    assert metadata_path(settings.model_path) == tmp_path / "weights" / "model.json"


def test_thread_defaults_follow_the_cpus_available() -> None:
    settings = Settings()
    assert settings.intra_op_threads == settings.cpu_workers == available_cpus() >= 1


@pytest.mark.parametrize(("sent", "kept"), [("cell.png", "cell.png"), ("C:\\Users\\x\\cell.png", "cell.png"),
                                            ("a/b/c.tif", "c.tif"), ("", "image"), (None, "image")],
                         ids=["plain", "windows-path", "posix-path", "empty", "none"])
def test_client_file_names_lose_their_directories(sent: str | None, kept: str) -> None:
    assert client_filename(sent) == kept


@pytest.mark.parametrize(("name", "stem"), [("cell 1.png", "cell_1"), ("../../etc/passwd", "passwd"),
                                            ("..png", "image"), ("ünïcode.tif", "n_code"),
                                            ("a\r\nb.jpg", "a_b")],
                         ids=["space", "traversal", "dots", "unicode", "newline"])
def test_safe_stems_are_plain_ascii_names(name: str, stem: str) -> None:
    assert safe_stem(name) == stem


def test_unique_stems_number_repeats_case_insensitively() -> None:
    assert unique_stems(["a.png", "a.tif", "A.jpg", "a_2.png", "b.png"]) == ["a", "a_2", "A_3", "a_2_2", "b"]


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("<!-- section:config -->"):]
    missing = [name for name in Settings.model_fields if f"`WBC_{name.upper()}`" not in table]
    assert not missing, f"settings without a row in the README's configuration table: {missing}"
