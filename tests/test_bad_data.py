"""Bad training data is refused before a run starts, naming file, line, id and what is wrong:
a missing or truncated image, a record whose size disagrees with its image (EXIF orientation
taken into account), bytes that are not UTF-8; ``data.on_bad_record=skip`` leaves such records
out and says so. Through the real entry points (GRPO, SFT, eval), which stop before Ray."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from rlsys.config import DataConfig
from rlsys.data.images import check_images, displayed_size, open_rgb
from rlsys.data.prepare import load_checked, load_samples
from rlsys.data.samples import DataError, load_dataset


def _record(rid: str, image: str, w: int, h: int) -> dict:
    return {
        "id": rid,
        "image": image,
        "width": w,
        "height": h,
        "task": "detection",
        "phrases": ["circle"],
        "instances": [{"phrase": "circle", "box": [1, 1, 10, 10]}],
    }


def _png(path, w=64, h=48):
    Image.new("RGB", (w, h), (200, 30, 30)).save(path)
    return path


def _write(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line)
    return path


@pytest.fixture
def data_dir(tmp_path):
    _png(tmp_path / "good.png")
    # a PNG cut in half: its header reads, its pixels do not
    whole = tmp_path / "whole.png"
    _png(whole, 256, 256)
    Image.effect_noise((256, 256), 80).convert("RGB").save(whole)
    (tmp_path / "truncated.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    # a JPEG stored 60x40 with EXIF orientation 6 (turned a quarter): displayed 40x60
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (60, 40), (10, 200, 10)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    return tmp_path


CASES = {
    "missing image": (
        [_record("a", "good.png", 64, 48), _record("b", "nowhere.png", 64, 48)],
        r"train.jsonl:2, id 'b': the image file does not exist",
    ),
    "truncated image": (
        [_record("a", "good.png", 64, 48), _record("c", "truncated.png", 256, 256)],
        r"train.jsonl:2, id 'c': the image does not read",
    ),
    "size disagrees": (
        [_record("d", "good.png", 192, 144), _record("a", "good.png", 64, 48)],
        r"train.jsonl:1, id 'd': the record says 192x144 but the image .*good.png is 64x48",
    ),
    "EXIF-rotated, annotated as stored": (
        [_record("e", "rotated.jpg", 60, 40)],
        r"train.jsonl:1, id 'e': the record says 60x40 but .* is 40x60 \(after its EXIF orientation\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grpo_refuses_a_bad_record_before_ray_naming_file_line_id_and_sizes(data_dir, case, capsys):
    from rlsys.grpo.run import main

    records, message = CASES[case]
    path = _write(data_dir / "train.jsonl", records)
    rc = main([f"data.train={path}", f"run.out_dir={data_dir / 'run'}", "tracking.mode=disabled"])
    err = capsys.readouterr().err
    assert rc == 2 and "data error" in err, err
    assert __import__("re").search(message, err), err
    assert not (data_dir / "run" / "tiny-model").exists()  # stopped before building a model, let alone Ray


def test_sft_and_eval_refuse_the_same(data_dir, capsys):
    from rlsys.eval.evaluate import main as eval_main
    from rlsys.sft.train import main as sft_main

    path = _write(data_dir / "train.jsonl", CASES["size disagrees"][0])
    assert sft_main([f"data.train={path}", f"run.out_dir={data_dir / 'sft'}", "tracking.mode=disabled"]) == 2
    assert "train.jsonl:1, id 'd': the record says 192x144" in capsys.readouterr().err
    model = data_dir / "model"  # eval checks the checkpoint's form first; its weights are never read here
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert eval_main(["--checkpoint", str(model), "--data", str(path), "--out", str(data_dir / "ev")]) == 2
    assert "train.jsonl:1, id 'd': the record says 192x144" in capsys.readouterr().err


def test_an_upright_record_of_an_exif_rotated_jpeg_is_accepted_and_read_upright(data_dir):
    path = _write(data_dir / "train.jsonl", [_record("e", "rotated.jpg", 40, 60)])
    (s,) = load_checked(path)
    assert displayed_size(s.image) == (40, 60) and open_rgb(s.image).size == (40, 60)  # the model sees it upright


def test_a_line_that_is_not_utf8_is_named_with_file_and_line(data_dir):
    path = _write(
        data_dir / "train.jsonl",
        [_record("a", "good.png", 64, 48)],
        raw_lines=[b'{"id": "caf\xe9", "image": "good.png"}\n'],
    )
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 \(byte 0xe9 at column 12\)"):
        load_dataset(path)
    coco = data_dir / "ann.json"
    coco.write_bytes(b'{"images": [],\n "categories": [{"id": 1, "name": "caf\xe9"}],\n "annotations": []}')
    with pytest.raises(DataError, match=r"ann.json:2: not UTF-8 \(byte 0xe9\)"):
        load_dataset(coco)


def test_skip_leaves_bad_records_out_counts_them_and_prints_the_first(data_dir, capsys):
    path = _write(
        data_dir / "train.jsonl",
        [_record("a", "good.png", 64, 48), _record("b", "nowhere.png", 64, 48), _record("d", "good.png", 192, 144)],
        raw_lines=[b"{not json\n", b'{"id": "\xff"}\n'],
    )
    samples = load_samples(DataConfig(train=str(path), on_bad_record="skip"), data_dir)
    out = capsys.readouterr().out
    assert [s.id for s in samples] == ["a"]
    assert "4 bad record(s) left out (data.on_bad_record=skip), 1 kept" in out
    for where in ("train.jsonl:2", "train.jsonl:3", "train.jsonl:4", "train.jsonl:5"):
        assert where in out, out
    with pytest.raises(DataError, match="no usable record"):
        load_checked(_write(data_dir / "bad.jsonl", [_record("b", "nowhere.png", 64, 48)]), "skip")


def test_every_bad_image_is_listed_not_only_the_first(data_dir):
    path = _write(data_dir / "train.jsonl", [_record(f"m{k}", "nowhere.png", 64, 48) for k in range(12)])
    with pytest.raises(DataError, match=r"12 record\(s\) .* cannot be used[\s\S]*and 2 more"):
        load_checked(path)


def test_check_images_reads_each_distinct_image_once(data_dir, monkeypatch):
    import rlsys.data.images as images

    seen = []
    real = images._inspect
    monkeypatch.setattr(images, "_inspect", lambda p: (seen.append(p), real(p))[1])
    samples = load_dataset(_write(data_dir / "t.jsonl", [_record(f"r{k}", "good.png", 64, 48) for k in range(50)]))
    assert check_images(samples) == [] and len(seen) == 1
