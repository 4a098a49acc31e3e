"""A small client for the detector served by :mod:`rlsys.serve` (standard library and PIL only).

    from rlsys.serve.client import DetectClient
    client = DetectClient("http://127.0.0.1:8000")
    result = client.detect("photo.jpg", categories=["person", "dog"])
    for obj in result["objects"]:
        print(obj["phrase"], obj.get("box") or obj.get("point") or obj.get("polygon"))

Coordinates in the answer are pixels of the image sent. A request the server refuses (4xx)
raises :class:`DetectError` carrying the server's message.
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request


class DetectError(RuntimeError):
    """The server refused the request (``status`` 4xx/5xx) or could not be reached (``status`` None)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message = status, message


def encode_image(image) -> str:
    """A path, PIL image or encoded bytes -> the request's ``image`` field. An http(s) URL string
    is passed through (the server fetches it only if its config allows)."""
    if isinstance(image, str) and image.lower().startswith(("http://", "https://")):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            data = f.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif hasattr(image, "save"):  # PIL.Image: sent as PNG, lossless
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise TypeError(f"image must be a path, PIL image or bytes, got {type(image).__name__}")
    return base64.b64encode(data).decode("ascii")


class DetectClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raw = exc.read().decode("utf-8", "replace")
            try:
                payload = json.loads(raw)
                msg = payload.get("error") or payload.get("detail") or raw
            except (ValueError, AttributeError):
                msg = raw or exc.reason
            raise DetectError(exc.code, str(msg)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise DetectError(None, f"cannot reach {self.base_url}: {getattr(exc, 'reason', exc)}") from None

    def detect(
        self,
        image,
        task: str = "detection",
        *,
        categories=None,
        expression: str | None = None,
        prompt_boxes=None,
        output: str | None = None,
        keypoint_names=None,
    ) -> dict:
        """``POST /v1/detect``; returns ``{"objects", "raw", "image_size", "latency_ms", ...}``.

        Only the fields given are sent; the server checks which ones the task takes.
        """
        body = {"image": encode_image(image), "task": task}
        for k, v in (
            ("categories", categories),
            ("expression", expression),
            ("prompt_boxes", prompt_boxes),
            ("output", output),
            ("keypoint_names", keypoint_names),
        ):
            if v is not None:
                body[k] = list(v) if k in ("categories", "keypoint_names") else v
        if "prompt_boxes" in body:
            body["prompt_boxes"] = [list(map(float, b)) for b in body["prompt_boxes"]]
        return self._call("POST", "/v1/detect", body)

    def health(self) -> dict:
        """``GET /v1/health``: the model directory, engine start time and batching settings."""
        return self._call("GET", "/v1/health")
