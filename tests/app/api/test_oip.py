"""The Open Inference Protocol v2 routes through HTTP: health and metadata, inference in JSON and in the
binary tensor extension with the same results as /v1/segment, errors as problems with an `error`, and a
round trip with tritonclient against a live server."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.live_server import serving
from support.service import copy_model, encode, png_array, problem, running, upload

from app.api.routes import oip
from app.api.settings import Settings
from model_training.synthetic import lobes, make_field

SHIPPED = Path(__file__).resolve().parents[3] / "weights" / "model.onnx"
TINY = "/v2/models/wbc-tiny"
HEADER = "Inference-Header-Content-Length"
OUTPUTS = {"labels": ("UINT8", [-1, -1]), "instances": ("UINT16", [-1, -1]), "cells": ("BYTES", [-1]),
           "summary": ("BYTES", [1])}


def image_input(data: bytes) -> dict[str, Any]:
    return {"name": "image", "datatype": "UINT8", "shape": [len(data)], "data": list(data)}


def outputs_of(body: dict[str, Any]) -> dict[str, Any]:
    """Output name → numpy array (masks) or list of JSON documents (cells, summary) of the JSON outputs."""
    values: dict[str, Any] = {}
    for output in body["outputs"]:
        if "data" not in output:
            continue
        if output["datatype"] == "BYTES":
            values[output["name"]] = [json.loads(text) for text in output["data"]]
        else:
            dtype = {"UINT8": np.uint8, "UINT16": np.uint16}[output["datatype"]]
            values[output["name"]] = np.array(output["data"], dtype).reshape(output["shape"])
    return values


def binary_outputs(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON header and name → value of the binary outputs, decoded as the extension defines them."""
    length = int(response.headers[HEADER])
    header, tail = json.loads(response.content[:length]), response.content[length:]
    values: dict[str, Any] = {}
    for output in header["outputs"]:
        if "data" in output:
            continue
        size = output["parameters"]["binary_data_size"]
        chunk, tail = tail[:size], tail[size:]
        if output["datatype"] == "BYTES":
            items = []
            while chunk:
                (n,), chunk = struct.unpack("<I", chunk[:4]), chunk[4:]
                items.append(json.loads(chunk[:n]))
                chunk = chunk[n:]
            values[output["name"]] = items
        else:
            dtype = {"UINT8": "<u1", "UINT16": "<u2"}[output["datatype"]]
            values[output["name"]] = np.frombuffer(chunk, dtype).reshape(output["shape"])
    assert tail == b""
    return header, values


@pytest.fixture(scope="module")
def field_png() -> bytes:
    cells = [(170, 150, 40, lobes(170, 150)), (460, 300, 36, [(460, 300, 22)]),
             (620, 90, 40, [(622, 90, 22)])]
    return encode(make_field(cells)[0])


@pytest.fixture
def shipped(settings_for: Callable[..., Settings]) -> Iterator[TestClient]:
    with running(settings_for(model_path=SHIPPED)) as client:
        yield client


def test_server_metadata_names_the_service_and_the_binary_extension(client: TestClient) -> None:
    body = client.get("/v2").json()
    assert body["name"] == "wbc-segmenter" and body["version"] == client.app.version
    assert body["extensions"] == ["binary_tensor_data"]


def test_health_and_model_ready_answer_once_the_model_is_loaded(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"{TINY}/ready").json() == {"name": "wbc-tiny", "ready": True}


def test_model_metadata_lists_the_image_input_and_every_output(client: TestClient) -> None:
    body = client.get(TINY).json()
    assert (body["name"], body["versions"]) == ("wbc-tiny", ["0.0.1"])
    assert body["platform"]
    assert body["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in body["outputs"]} == OUTPUTS


@pytest.mark.parametrize(("method", "path"), [("GET", "/v2/models/other"), ("GET", "/v2/models/other/ready"),
                                              ("POST", "/v2/models/other/infer")],
                         ids=["metadata", "ready", "infer"])
def test_an_unknown_model_is_a_404_problem_naming_the_served_one(client: TestClient, png_bytes: bytes,
                                                                method: str, path: str) -> None:
    body = problem(client.request(method, path, json={"inputs": [image_input(png_bytes)]}), 404)
    assert "wbc-tiny" in body["detail"] and body["error"] == body["detail"]


def test_an_unready_service_answers_503_but_stays_live(settings_for: Callable[..., Settings],
                                                      tiny_model_dir: Path, tmp_path: Path,
                                                      png_bytes: bytes) -> None:
    model = copy_model(tiny_model_dir, tmp_path, sha256="0" * 64)
    with running(settings_for(model_path=model)) as client:
        assert client.get("/v2/health/live").status_code == 200
        for path in ("/v2/health/ready", TINY, f"{TINY}/ready"):
            assert problem(client.get(path), 503)["error"]
        problem(client.post(f"{TINY}/infer", json={"inputs": [image_input(png_bytes)]}), 503)


def test_json_inference_returns_what_v1_segment_returns(shipped: TestClient, field_png: bytes) -> None:
    request = {"id": "req-1", "inputs": [image_input(field_png)], "parameters": {"pixel_size_um": 0.2}}
    response = shipped.post("/v2/models/wbc-attention-unet/infer", json=request)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["id"]) == ("wbc-attention-unet", "req-1")
    got = outputs_of(body)
    v1 = shipped.post("/v1/segment?pixel_size_um=0.2", files=upload(field_png)).json()
    labels = png_array(shipped.post("/v1/segment?format=png", files=upload(field_png)).content)
    instances = png_array(shipped.post("/v1/segment?format=instances", files=upload(field_png)).content)
    assert got["labels"].shape == (480, 640) and np.array_equal(got["labels"], labels)
    assert np.array_equal(got["instances"], instances) and got["instances"].max() == 3
    assert got["cells"] == v1["cells"] and len(got["cells"]) == 3
    [summary] = got["summary"]
    assert "filename" not in summary and summary.pop("inference_ms") > 0
    assert summary == {k: v for k, v in v1.items() if k not in ("cells", "filename", "inference_ms")}
    assert body["model_version"] == v1["model"]["version"]


def test_binary_request_and_outputs_carry_the_same_results_as_json(client: TestClient,
                                                                   png_bytes: bytes) -> None:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [len(png_bytes)],
                                     "parameters": {"binary_data_size": len(png_bytes)}}],
                         "outputs": [{"name": "labels", "parameters": {"binary_data": True}},
                                     {"name": "cells", "parameters": {"binary_data": True}},
                                     {"name": "instances"}]}).encode()
    response = client.post(f"{TINY}/infer", content=header + png_bytes, headers={HEADER: str(len(header))})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    document, binary = binary_outputs(response)
    assert [o["name"] for o in document["outputs"]] == ["labels", "cells", "instances"]
    as_json = outputs_of(client.post(f"{TINY}/infer", json={"inputs": [image_input(png_bytes)]}).json())
    assert np.array_equal(binary["labels"], as_json["labels"]) and binary["cells"] == as_json["cells"]
    assert np.array_equal(outputs_of(document)["instances"], as_json["instances"]), "instances stayed JSON"


def test_binary_data_output_sends_every_output_as_binary(client: TestClient, png_bytes: bytes) -> None:
    request = {"inputs": [image_input(png_bytes)], "parameters": {"binary_data_output": True}}
    document, values = binary_outputs(client.post(f"{TINY}/infer", json=request))
    assert [o["name"] for o in document["outputs"]] == list(OUTPUTS)
    assert values["labels"].shape == values["instances"].shape == (80, 96)


def _header_only(document: dict[str, Any], tail: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    return header + tail, {HEADER: str(len(header))}


def _json(**changes: Any) -> bytes:
    """A request for a two-byte "file" with `changes` to its input (`input`) or to the request."""
    request = {"inputs": [{**image_input(b"ab"), **changes.pop("input", {})}], **changes}
    return json.dumps(request).encode()


BAD_REQUESTS = {
    "not JSON": (400, b"{", {}),
    "header length past the body": (400, b"{}", {HEADER: "99"}),
    "header length of 4301 digits": (400, b"{}", {HEADER: "1" * 4301}),
    "header length not a number": (400, b"{}", {HEADER: "12ab"}),
    "binary size past the body": (400, *_header_only({"inputs": [{"name": "image", "datatype": "UINT8",
                                                                   "shape": [9], "parameters": {
                                                                       "binary_data_size": 9}}]}, b"abc")),
    "no inputs": (422, json.dumps({"inputs": []}).encode(), {}),
    "shape not a list": (422, json.dumps({"inputs": [{"name": "image", "datatype": "UINT8",
                                                      "shape": "3"}]}).encode(), {}),
    "another input": (422, _json(input={"name": "x"}), {}),
    "two images": (422, _json(inputs=[image_input(b"ab"), image_input(b"ab")]), {}),
    "a float tensor": (422, _json(input={"datatype": "FP32"}), {}),
    "shape not the data's": (422, _json(input={"shape": [3]}), {}),
    "a batch shape": (422, _json(input={"shape": [1, 2]}), {}),
    "a byte over 255": (422, _json(input={"data": [1, 256]}), {}),
    "floats as bytes": (422, _json(input={"data": [1.5, 2]}), {}),
    "an unknown output": (422, _json(outputs=[{"name": "logits"}]), {}),
    "a negative pixel size": (422, _json(parameters={"pixel_size_um": -1}), {}),
    "a diameter as text": (422, _json(parameters={"cell_diameter_px": "40"}), {}),
    "bytes that are no image": (415, json.dumps({"inputs": [image_input(b"not an image")]}).encode(), {}),
}


@pytest.mark.parametrize(("status", "body", "headers"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_a_problem_with_an_error_member(client: TestClient, status: int, body: bytes,
                                                         headers: dict[str, str]) -> None:
    answer = problem(client.post(f"{TINY}/infer", content=body, headers=headers), status)
    assert answer["error"] == answer["detail"]


def test_a_file_over_the_limit_is_refused_with_413(settings_for: Callable[..., Settings],
                                                   png_bytes: bytes) -> None:
    with running(settings_for(max_file_bytes=len(png_bytes) - 1)) as client:
        problem(client.post(f"{TINY}/infer", json={"inputs": [image_input(png_bytes)]}), 413)


def test_a_json_part_over_its_limit_is_refused_before_parsing_and_binary_takes_the_same_file(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, png_bytes: bytes) -> None:
    monkeypatch.setattr(oip, "MAX_JSON_BYTES", 1000)
    document = {"inputs": [image_input(png_bytes)]}
    assert len(json.dumps(document)) > 1000
    answer = problem(client.post(f"{TINY}/infer", json=document), 413)
    assert "binary" in answer["detail"]
    binary = {"name": "image", "datatype": "UINT8", "shape": [len(png_bytes)],
              "parameters": {"binary_data_size": len(png_bytes)}}
    header, headers = _header_only({"inputs": [binary]}, png_bytes)
    assert client.post(f"{TINY}/infer", content=header, headers=headers).status_code == 200


def test_the_api_key_guards_the_v2_models_and_leaves_the_probes_open(
        settings_for: Callable[..., Settings]) -> None:
    with running(settings_for(api_key="k3y")) as client:
        problem(client.get(TINY), 401)
        assert client.get(TINY, headers={"X-API-Key": "k3y"}).status_code == 200
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path


def test_tritonclient_round_trip_matches_v1_segment(settings_for: Callable[..., Settings],
                                                    field_png: bytes) -> None:
    http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    with serving(settings_for(model_path=SHIPPED)) as url:
        triton = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120.0)
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready("wbc-attention-unet") and not triton.is_model_ready("other")
        metadata = triton.get_model_metadata("wbc-attention-unet")
        assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("image", "UINT8")]
        assert {t["name"]: t["datatype"] for t in metadata["outputs"]} == \
            {name: datatype for name, (datatype, _) in OUTPUTS.items()}

        def v1(output: str) -> httpx.Response:
            return httpx.post(f"{url}/v1/segment?format={output}", files=upload(field_png), timeout=60)

        cells, labels, instances = v1("json").json()["cells"], png_array(v1("png").content), \
            png_array(v1("instances").content)
        for binary in (True, False):  # tritonclient's default (binary), and JSON
            image = http.InferInput("image", [len(field_png)], "UINT8")
            image.set_data_from_numpy(np.frombuffer(field_png, np.uint8), binary_data=binary)
            outputs = [http.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
            result = triton.infer("wbc-attention-unet", [image], outputs=outputs)
            assert np.array_equal(result.as_numpy("labels"), labels)
            assert result.as_numpy("instances").dtype == np.uint16
            assert np.array_equal(result.as_numpy("instances"), instances)
            assert [json.loads(cell) for cell in result.as_numpy("cells")] == cells
        with pytest.raises(InferenceServerException) as refused:
            triton.infer("other", [image])
        assert refused.value.status() == "404" and "wbc-attention-unet" in refused.value.message()
        triton.close()
