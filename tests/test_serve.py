"""Serving: request validation and bin->pixel mapping alone (fast), two thousand fuzzed bodies
through the app's own checks in-process (fast), then one real Serve app on the tiny model, called
over HTTP (slow): every task, every class of bad input, a concurrent burst, the client and the CLI,
and a sample of the fuzzed bodies answered with the statuses the in-process checks give them. The
tiny model is random, so answers are checked for shape, not content."""

import base64
import io
import json
import os
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from PIL import Image

from rlsys.config import REPO_ROOT, ServeConfig
from rlsys.serve.app import AppArgs, load_serve_config
from rlsys.serve.requests import DetectRequest, RequestError, check_request, load_image, to_objects

W, H = 160, 120


def _image_bytes(w=W, h=H, fmt="PNG") -> bytes:
    im = Image.new("RGB", (w, h), (200, 60, 30))
    im.paste((20, 90, 220), (w // 4, h // 4, w // 2, h // 2))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _letters(n: int, seed: int) -> str:
    import random
    import string

    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------------------------
# Fast: no Ray, no engine
# ---------------------------------------------------------------------------------------------
def test_shipped_serve_configs_load():
    cfg = load_serve_config(REPO_ROOT / "configs" / "serve_tiny_cpu.yaml")
    assert cfg.batching.enabled and cfg.deployment.min_replicas <= cfg.deployment.max_replicas
    # the Serve config file is valid for Serve, points at our builder, and its args fit AppArgs
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO_ROOT / "configs" / "serve_app.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "rlsys.serve:app_builder"
    args = AppArgs.model_validate(app["args"])
    assert isinstance(load_serve_config(args.config, args.overrides), ServeConfig)


def test_to_objects_maps_bins_to_request_pixels():
    # bin b of 999 on a side of s pixels is b / 999 * s: 0 -> 0, 999 -> s, 333 -> s / 3
    text = (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><333><999><999>,<333><0><666><333><|box_end|>, "
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>None<|box_end|>, "
        "<|object_ref_start|>tip<|object_ref_end|><|box_start|><999><0><|box_end|>"
    )
    objs, bad = to_objects(text, "detection", 300, 600)
    assert bad == 0
    assert objs == [
        {"phrase": "cat", "box": [0.0, 200.0, 300.0, 600.0]},
        {"phrase": "cat", "box": [100.0, 0.0, 200.0, 200.0]},
        {"phrase": "tip", "point": [300.0, 0.0]},  # "dog" is absent: no object
    ]
    kp = '{"person1": {"box": <0><0><999><999>, "keypoints": {"nose": <333><666>, "left eye": "unvisible"}}}'
    objs, bad = to_objects(kp, "keypoint", 300, 600)
    assert bad == 0 and objs == [
        {"phrase": "person1", "box": [0.0, 0.0, 300.0, 600.0], "keypoints": {"nose": [100.0, 400.0], "left eye": None}}
    ]
    objs, bad = to_objects("gibberish <12>", "detection", 300, 600)
    assert objs == [] and bad == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ({"task": "detection"}, "needs field 'categories'"),
        ({"task": "detection", "categories": ["a"], "expression": "x"}, "do not apply to task 'detection'"),
        ({"task": "pointing", "categories": ["a"], "output": "box"}, "not available for task 'pointing'"),
        ({"task": "detection", "categories": ["a"] * 9}, "too many categories"),
        ({"task": "detection", "categories": ["<|box_start|>"]}, "special token"),
        ({"task": "referring", "expression": "x" * 201}, "over the limit"),
        ({"task": "visual_prompt", "prompt_boxes": [[5, 5, 1, 9]]}, "inverted"),
        ({"task": "visual_prompt", "prompt_boxes": [[1, 2, 3]]}, "4 finite numbers"),
    ],
)
def test_check_request_names_the_problem(body, message):
    limits = ServeConfig().limits.model_copy(update={"max_categories": 8})
    with pytest.raises(RequestError, match=message) as e:
        check_request(DetectRequest(image="", **body), limits)
    assert e.value.status == 422


def test_load_image_limits_and_formats():
    limits = ServeConfig().limits.model_copy(update={"max_image_bytes": 4096, "max_image_pixels": 100_000})
    assert load_image(_b64(_image_bytes()), limits).size == (W, H)
    assert load_image("data:image/jpeg;base64," + _b64(_image_bytes(fmt="JPEG")), limits).size == (W, H)
    cases = [
        ("http://example.com/a.png", 400, "URL"),
        ("%%%", 400, "base64"),
        (_b64(b"hello"), 400, "PNG or JPEG"),
        (_b64(_image_bytes(fmt="GIF")), 400, "PNG or JPEG"),
        (_b64(os.urandom(5000)), 413, "bytes"),
        (_b64(_image_bytes(400, 300)), 413, "pixels"),
        (_b64(_image_bytes(300, 1)), 422, "aspect ratio"),
    ]
    for spec, status, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            load_image(spec, limits)
        assert e.value.status == status, spec[:40]


# ---------------------------------------------------------------------------------------------
# Slow: one Serve app for the module
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the live app's settings; the in-process fuzz test checks bodies against the same ones
SERVER_OVERRIDES = [
    "generation.max_new_tokens=24",
    "limits.max_image_bytes=200000",
    "limits.max_image_pixels=1000000",
    "limits.max_categories=8",
    "deployment.name=detector-test",
]


def _checks(cfg, model_dir):
    """What the app's checks need besides the body: the tokenizer's control tokens and the
    vocabulary, read from the checkpoint as the replica reads them."""
    from rlsys.lang.format import control_tokens
    from rlsys.lang.vocab import vocabulary_for
    from rlsys.models import processor_for

    proc = processor_for(cfg.model, str(model_dir))
    return control_tokens(proc.tokenizer), vocabulary_for(cfg.model, proc)


@pytest.fixture(scope="module")
def server(tiny_model_dir, ray_local):
    from ray import serve

    from rlsys.serve.app import build_app

    cfg = load_serve_config(overrides=SERVER_OVERRIDES)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg, tiny_model_dir), name=cfg.deployment.name, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}", cfg, tiny_model_dir
    finally:
        serve.shutdown()  # the suite's Ray instance goes on


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url + "/v1/detect", data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _check_answer(ans: dict, w=W, h=H):
    assert set(ans) >= {"objects", "raw", "image_size", "latency_ms"}
    assert ans["image_size"] == [w, h] and isinstance(ans["raw"], str) and ans["latency_ms"] > 0
    for obj in ans["objects"]:  # whatever the random model wrote, decoded into the image
        xy = [v for k in ("box", "point", "polygon") for v in obj.get(k, [])]
        assert isinstance(obj["phrase"], str) and all(0 <= v <= max(w, h) for v in xy)


GOOD = {
    "detection": {"categories": ["red square", "blue square"]},
    "referring": {"expression": "the blue square on the left"},
    "pointing": {"categories": ["blue square"]},
    "visual_prompt": {"prompt_boxes": [[40, 30, 80, 60]]},
    "ocr": {"output": "polygon"},
    "gui": {"expression": "the submit button", "output": "box"},
    "keypoint": {"categories": ["person"], "keypoint_names": ["nose", "left eye"]},
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(GOOD))
def test_every_task_answers(server, task):
    url = server[0]
    status, ans = _post(url, {"image": _b64(_image_bytes()), "task": task, **GOOD[task]})
    assert status == 200, ans
    _check_answer(ans)


@pytest.mark.slow
def test_health(server):
    url = server[0]
    with urllib.request.urlopen(url + "/-/healthz", timeout=30) as r:  # answered by Serve's proxy
        assert r.status == 200
    with urllib.request.urlopen(url + "/v1/health", timeout=30) as r:  # answered by the replica
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.slow
def test_bad_requests_get_4xx_and_server_stays_up(server):
    url, cfg, _ = server
    png = _b64(_image_bytes())
    det = {"image": png, "task": "detection", "categories": ["a"]}
    bad = [
        ("malformed JSON", b'{"image": "abc", "task": ', 400, "malformed JSON"),
        ("not an object", b"[1, 2]", 422, "JSON object"),
        ("missing field", {"task": "detection", "categories": ["a"]}, 422, "missing field 'image'"),
        ("unknown field", {**det, "categorie": ["a"]}, 422, "unknown field 'categorie'"),
        ("bad task", {**det, "task": "segmentation"}, 422, "task"),
        ("wrong type", {**det, "categories": [1, 2]}, 422, "categories"),
        ("bad base64", {**det, "image": "not base64!"}, 400, "base64"),
        ("non-image", {**det, "image": _b64(b"GIF89a but not really")}, 400, "PNG or JPEG"),
        ("over byte limit", {**det, "image": _b64(os.urandom(210_000))}, 413, "bytes"),
        ("over pixel limit", {**det, "image": _b64(_image_bytes(1200, 1000))}, 413, "pixels"),
        ("body over limit", b"x" * (cfg.limits.max_request_bytes + 1), 413, "request body"),
        ("too many categories", {**det, "categories": [f"c{i}" for i in range(9)]}, 422, "too many categories"),
        (
            "box outside image",
            {"image": png, "task": "visual_prompt", "prompt_boxes": [[10, 10, 500, 50]]},
            422,
            "outside",
        ),
        ("wrong output", {**det, "output": "polygon"}, 422, "not available"),
        ("field of another task", {**det, "expression": "x"}, 422, "do not apply"),
        ("URL with fetching off", {**det, "image": "http://127.0.0.1:1/x.png"}, 400, "does not fetch URLs"),
        # valid fields, but ~1,500 prompt tokens > max_model_len 1024: vLLM refuses, we answer 422
        (
            "prompt over the context",
            {**det, "categories": [_letters(200, seed=i) for i in range(8)]},
            422,
            "cannot take",
        ),
    ]
    for name, body, status, message in bad:
        got, ans = _post(url, body)
        assert (got, message in ans.get("error", "")) == (status, True), (name, got, ans)
    status, ans = _post(url, det)
    assert status == 200, ans
    _check_answer(ans)


@pytest.mark.slow
def test_concurrent_burst_all_answered(server):
    from rlsys.serve.client import DetectClient

    url = server[0]
    client = DetectClient(url, timeout_s=120)
    img = Image.open(io.BytesIO(_image_bytes())).convert("RGB")  # loaded: a lazy PIL image is not thread-safe
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: client.detect(img, categories=[f"object {i}"]), range(16)))
    assert len(answers) == 16
    for ans in answers:
        _check_answer(ans)


@pytest.mark.slow
def test_client_error_and_cli(server, tmp_path, capsys):
    from rlsys.serve import detect
    from rlsys.serve.client import DetectClient, DetectError

    url = server[0]
    src = tmp_path / "in.jpg"
    src.write_bytes(_image_bytes(fmt="JPEG"))
    with pytest.raises(DetectError, match="not available for task 'pointing'") as e:
        DetectClient(url).detect(src, "pointing", categories=["a"], output="box")
    assert e.value.status == 422

    out = tmp_path / "out.png"
    assert detect.main([str(src), "--url", url, "--categories", "red square,blue square", "--save", str(out)]) == 0
    _check_answer(json.loads(capsys.readouterr().out))
    with Image.open(out) as im:
        assert im.size == (W, H)
    # drawing handles every geometry
    objs = [
        {"phrase": "a", "box": [1, 2, 50, 60]},
        {"phrase": "b", "point": [10, 10]},
        {"phrase": "c", "polygon": [1, 1, 30, 1, 30, 30]},
        {"phrase": "d", "box": [5, 5, 20, 20], "keypoints": {"nose": [8, 8], "eye": None}},
    ]
    assert detect.draw_objects(Image.new("RGB", (W, H)), objs).size == (W, H)


def _fuzz_bodies(n: int, seed: int, png: str):
    """``n`` generated request bodies: broken encodings and structures, wrong types and values
    for every field, control tokens in phrases, deep nesting, and a few valid requests."""
    import random

    rng = random.Random(seed)
    tasks = [
        "detection",
        "referring",
        "pointing",
        "visual_prompt",
        "ocr",
        "gui",
        "keypoint",
        "layout",
        "nope",
        "",
        None,
        7,
    ]
    fields = ["image", "task", "categories", "expression", "prompt_boxes", "output", "keypoint_names"]
    controls = [
        "<|image_pad|>",
        "<|im_start|>",
        "<|endoftext|>",
        "<|vision_start|>",
        "<|video_pad|>",
        "<12>",
        "<|box_end|>",
    ]

    def scalar():
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                -1,
                2**70,
                1e308,
                -0.0,
                "",
                "a",
                "é漢字🙂",
                "\x00",
                "\ud800" if rng.random() < 0.1 else "x",
                "<|image_pad|>",
                "A" * rng.randint(1, 400),
                [],
                {},
            ]
        )

    def value(depth=0):
        r = rng.random()
        if depth > 3 or r < 0.5:
            return scalar()
        if r < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 5))]
        return {rng.choice(fields + ["zzz"]): value(depth + 1) for _ in range(rng.randint(0, 4))}

    def phrase():
        p = rng.choice(["cat", "red square", "the blue one", "< 5 >", "<|image pad|>", ""])
        if rng.random() < 0.4:
            k = rng.randint(0, len(p))
            p = p[:k] + rng.choice(controls) + p[k:]
        return p

    for i in range(n):
        kind = rng.random()
        if kind < 0.15:  # raw bytes: truncated JSON, binary, bad UTF-8, deep nesting
            yield rng.choice(
                [
                    b"",
                    b"{",
                    b'{"image": ',
                    b"\xff\xfe\x00",
                    os.urandom(rng.randint(1, 64)),
                    b"[" * rng.randint(1000, 200_000),
                    b'{"a":' * rng.randint(1000, 50_000),
                    b"null",
                    b"1e999",
                    b'"str"',
                    b"{}" * 3,
                ]
            )
        elif kind < 0.45:  # random structures with the real field names
            yield {rng.choice(fields): value() for _ in range(rng.randint(0, 6))}
        else:  # well-formed shape, generated values; ~1 in 12 is fully valid and reaches the engine
            task = rng.choice(tasks)
            body = {
                "image": png
                if rng.random() < 0.8
                else rng.choice(["", "###", _b64(b"\x89PNG\r\n"), "data:image/png;base64," + png]),
                "task": task,
            }
            if rng.random() < 0.7:
                body["categories"] = [phrase() for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.3:
                body["expression"] = phrase()
            if rng.random() < 0.2:
                body["prompt_boxes"] = [
                    [rng.uniform(-50, 250) for _ in range(rng.choice([3, 4, 4, 5]))] for _ in range(rng.randint(0, 3))
                ]
            if rng.random() < 0.2:
                body["output"] = rng.choice(["box", "point", "polygon", "mask", 3])
            if rng.random() < 0.1:
                body["keypoint_names"] = [phrase() for _ in range(rng.randint(0, 3))]
            yield body


def _body_bytes(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def test_fuzzed_bodies_are_refused_with_a_message_or_prepared(tiny_model_dir):
    """Two thousand generated bodies through the app's own checks, in-process (the function the
    app calls before its engine, with the live app's settings, control tokens and vocabulary):
    every body is either refused with a 4xx status and a message, or prepared for the engine;
    nothing raises past the checks. Before the fix a deeply nested body was a 500. The live app
    answers a sample of the same bodies over HTTP below, with the same statuses."""
    from rlsys.serve.requests import Prepared, prepare_request

    cfg = load_serve_config(overrides=SERVER_OVERRIDES)
    control, vocab = _checks(cfg, tiny_model_dir)
    limits, png = cfg.limits, _b64(_image_bytes())
    results = [
        prepare_request(_body_bytes(b), limits, control, vocab, cfg.model.prompt_set)
        for b in _fuzz_bodies(2000, seed=18, png=png)
    ]
    refused = [r for r in results if isinstance(r, RequestError)]
    prepared = [r for r in results if isinstance(r, Prepared)]
    assert len(refused) + len(prepared) == 2000
    assert all(400 <= r.status < 500 and r.message for r in refused), [(r.status, r.message) for r in refused][:5]
    assert len(refused) > 1000 and prepared, (len(refused), len(prepared))
    # what reaches the engine is a question about a decoded image, in the request's pixels
    assert all(p.question and p.image.size == (W, H) for p in prepared)


@pytest.mark.slow
def test_fuzzed_requests_over_http_get_the_in_process_status_and_never_a_5xx(server):
    """A few dozen of the fuzzed bodies against the real app over loopback (8 at a time): none is
    answered 5xx, each refusal carries its message as JSON with the status the in-process checks
    give it, and a good request still succeeds afterwards."""
    from rlsys.serve.requests import prepare_request

    url, cfg, model_dir = server
    png = _b64(_image_bytes())

    def send(body):
        req = urllib.request.Request(
            url + "/v1/detect", data=_body_bytes(body), method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    # of the 2,000 in-process bodies, about 40 the checks refuse (every 30th, of every kind the
    # generator makes) and the first 8 they pass, which reach the engine
    control, vocab = _checks(cfg, model_dir)
    fuzzed = [
        (b, prepare_request(_body_bytes(b), cfg.limits, control, vocab, cfg.model.prompt_set))
        for b in _fuzz_bodies(2000, seed=18, png=png)
    ]
    refused = [(b, r) for b, r in fuzzed if isinstance(r, RequestError)][::30]
    passed = [(b, r) for b, r in fuzzed if not isinstance(r, RequestError)][:8]
    assert len(refused) > 30 and len(passed) == 8, (len(refused), len(passed))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, [b for b, _ in refused + passed]))
    assert not [s for s, _ in results if s >= 500], [(s, b[:200]) for s, b in results if s >= 500][:5]
    for (body, local), (status, raw) in zip(refused, results):  # the same status and words over HTTP
        assert (status, json.loads(raw)["error"]) == (local.status, local.message), (
            body if isinstance(body, bytes) else str(body)[:300]
        )
    for (body, _), (status, raw) in zip(passed, results[len(refused) :]):
        # answered, or refused by the engine (a prompt past the context: 422 with its message)
        assert status == 200 or (status == 422 and "cannot take" in json.loads(raw)["error"]), (status, raw[:300])
    assert sum(s == 200 for s, _ in results[len(refused) :]) > 0, results[len(refused) :]
    status, ans = _post(url, {"image": png, "task": "detection", "categories": ["red square"]})
    assert status == 200, ans
    _check_answer(ans)
