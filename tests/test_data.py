import json
from pathlib import Path

import numpy as np
import pytest

from rlsys.data import samples as data
from rlsys.data import synthetic
from rlsys.data.samples import DataError, Sample, load_coco, load_jsonl


def _rec(**kw):
    r = {
        "id": "s1",
        "image": "a.png",
        "width": 100,
        "height": 50,
        "task": "detection",
        "phrases": ["cat"],
        "instances": [{"phrase": "cat", "box": [10, 10, 20, 20]}],
    }
    r.update(kw)
    return r


def _write(tmp_path, recs, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return p


def test_jsonl_round_trip(tmp_path):
    p = _write(tmp_path, [_rec(), _rec(id="s2", phrases=["cat", "dog"])])
    s = load_jsonl(p)
    assert [x.id for x in s] == ["s1", "s2"]
    assert s[0].image == str(tmp_path / "a.png")  # relative to the file's folder
    assert s[0].instances[0].box == (10.0, 10.0, 20.0, 20.0)
    assert s[1].instances_of("dog") == []  # absent phrase -> None answer


@pytest.mark.parametrize(
    "rec, field, message",
    [
        (_rec(task="segment"), "task", "not one of"),
        (_rec(width=0), "width", "positive integer"),
        (_rec(instances=[{"phrase": "cat", "box": [30, 10, 20, 20]}]), "instances[0].box", "no area"),
        (_rec(instances=[{"phrase": "cat", "box": [10, 10, 200, 20]}]), "instances[0].box", "outside the 100x50 image"),
        (_rec(instances=[{"phrase": "cat", "box": [10, "x", 20, 20]}]), "instances[0].box", "not a finite number"),
        (
            _rec(instances=[{"phrase": "dog", "box": [10, 10, 20, 20]}]),
            "instances[0].phrase",
            "not one of the sample's phrases",
        ),
        (_rec(instances=[{"phrase": "cat"}]), "instances[0].box", "missing for output 'box'"),
        (
            _rec(instances=[{"phrase": "cat", "box": [1, 1, 2, 2], "mask": {"size": [5, 5], "counts": ""}}]),
            "instances[0].mask",
            "COCO RLE",
        ),
        (_rec(task="visual_prompt"), "prompt_boxes", "at least one box"),
        ({k: v for k, v in _rec().items() if k != "phrases"}, "phrases", "missing"),
    ],
)
def test_malformed_record_names_file_record_and_field(tmp_path, rec, field, message):
    p = _write(tmp_path, [_rec(id="ok"), rec])
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert f"{p}:2" in msg, msg  # file and line
    assert f"field '{field}'" in msg, msg
    assert message in msg, msg


def test_bad_json_line(tmp_path):
    p = _write(tmp_path, [_rec(), "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_jsonl(p)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no records"):
        load_jsonl(tmp_path / "e.jsonl")


def _coco(tmp_path, anns, cats=None):
    d = {
        "images": [{"id": 1, "file_name": "i.png", "width": 40, "height": 30}],
        "categories": cats or [{"id": 1, "name": "cup"}],
        "annotations": anns,
    }
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(d))
    return p


def test_coco_polygon_becomes_rle_and_box_is_xyxy(tmp_path):
    from pycocotools import mask as mask_utils

    seg = [[5, 5, 15, 5, 15, 10, 5, 10]]
    p = _coco(
        tmp_path,
        [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 1,
                "bbox": [5, 5, 10, 5],
                "area": 50,
                "iscrowd": 0,
                "segmentation": seg,
            },
            {
                "id": 8,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 40, 30],
                "area": 1,
                "iscrowd": 1,
                "segmentation": seg,
            },
        ],
    )
    s = load_coco(p)
    assert len(s) == 1 and s[0].phrases == ["cup"]
    assert len(s[0].instances) == 1  # the crowd annotation is not ground truth
    inst = s[0].instances[0]
    assert inst.box == (5.0, 5.0, 15.0, 10.0)
    m = mask_utils.decode({"size": inst.mask["size"], "counts": inst.mask["counts"].encode()})
    assert m.shape == (30, 40) and m[7, 10] == 1 and m[20, 30] == 0


def test_coco_bad_annotation_is_named(tmp_path):
    p = _coco(tmp_path, [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"annotation id 9\), field 'category_id'"):
        load_coco(p)
    p = _coco(tmp_path, [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1], "iscrowd": 0}])
    with pytest.raises(DataError, match=r"annotation id 3\), field 'bbox'"):
        load_coco(p)


def test_synthetic_is_deterministic_and_loads_in_both_formats(tmp_path):
    a = synthetic.generate(tmp_path / "a", num_images=24, seed=3)
    b = synthetic.generate(tmp_path / "b", num_images=24, seed=3)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a/images/train_00005.png").read_bytes() == (tmp_path / "b/images/train_00005.png").read_bytes()
    samples = load_jsonl(a)
    assert len(samples) == 24  # one sample per image, none dropped
    coco = load_coco(tmp_path / "a/train_coco.json")
    assert {s.task for s in coco} == {"detection"}
    # every shape-scene image appears in the COCO file with the same boxes as its JSONL detection sample
    by_image = {s.image: s for s in coco}
    for s in samples:
        if s.task == "detection":
            boxes = sorted(i.box for i in s.instances)
            assert sorted(i.box for i in by_image[s.image].instances) == boxes


def test_synthetic_masks_are_exact(tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils

    p = synthetic.generate(tmp_path, num_images=40, seed=1, tasks=("pointing",))
    for s in load_jsonl(p)[:10]:
        img = np.array(Image.open(s.image).convert("RGB")).astype(int)
        for inst in s.instances:
            m = mask_utils.decode({"size": inst.mask["size"], "counts": inst.mask["counts"].encode()}).astype(bool)
            x0, y0, x1, y1 = (int(v) for v in inst.box)
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            # the point lies inside the mask, and the mask pixels carry one shape colour
            px, py = inst.point
            assert m[int(py), int(px)]
            colours = {tuple(c) for c in img[m][:50]}
            assert len(colours) == 1 and tuple(colours.pop()) in {tuple(v) for v in synthetic.COLORS.values()}


def test_synthetic_covers_every_task(tmp_path):
    p = synthetic.generate(tmp_path, num_images=120, seed=0)
    tasks = {s.task for s in load_jsonl(p)}
    assert tasks == {"detection", "referring", "pointing", "visual_prompt", "keypoint", "gui", "ocr"}


def test_sample_dict_round_trip():
    s = Sample.from_dict(_rec(instances=[{"phrase": "cat", "box": [1, 2, 3, 4], "keypoints": {"nose": [2, 3, 2]}}]))
    assert Sample.from_dict(s.to_dict()).instances == s.instances
    assert data.TASKS[0] == "detection"


def test_position_ramp_hand_worked():
    from PIL import Image

    # 4x2 image, one colour (100, 200, 50); 51 levels: colours x (1 - 51/255) = x 0.8 -> (80, 160, 40),
    # then red += 51 * col/4 (0, 12.75, 25.5, 38.25), green += 51 * row/2 (0, 25.5); rounded
    img = Image.new("RGB", (4, 2), (100, 200, 50))
    a = np.asarray(synthetic.paint_position_ramp(img, 51)).astype(int)
    assert a[0, :, 0].tolist() == [80, 93, 106, 118]
    assert a[:, 0, 1].tolist() == [160, 186]
    assert a[:, :, 2].tolist() == [[40] * 4, [40] * 4]
    # white and black never clip: the ramp survives everywhere
    for c in (0, 255):
        r = np.asarray(synthetic.paint_position_ramp(Image.new("RGB", (64, 64), (c, c, c)), 100)).astype(int)
        assert (np.diff(r[0, :, 0]) >= 0).all() and r[0, -1, 0] - r[0, 0, 0] >= 97
        assert (np.diff(r[:, 0, 1]) >= 0).all() and r[-1, 0, 1] - r[0, 0, 1] >= 97


def test_synthetic_with_ramp_keeps_the_ground_truth(tmp_path):
    plain = synthetic.generate(tmp_path / "a", num_images=6, seed=3, split="val", image_size=64)
    ramp = synthetic.generate(tmp_path / "b", num_images=6, seed=3, split="val", image_size=64, position_ramp_levels=80)
    assert plain.read_text() == ramp.read_text()  # same scenes, same boxes and masks
    from PIL import Image

    s = load_jsonl(plain)[0]
    rel = Path(s.image).relative_to(plain.parent)  # the loader resolves image paths
    a = np.asarray(Image.open(plain.parent / rel)).astype(float)
    b = np.asarray(Image.open(ramp.parent / rel)).astype(float)
    assert not np.array_equal(a, b)
    assert (b[:, -1, 0] - b[:, 0, 0]).mean() > 50  # red rises left to right


def test_synthetic_one_kind_scenes(tmp_path):
    mixed = load_jsonl(
        synthetic.generate(tmp_path / "a", num_images=60, seed=4, image_size=112, max_objects=3, tasks=("detection",))
    )
    one = load_jsonl(
        synthetic.generate(
            tmp_path / "b",
            num_images=60,
            seed=4,
            image_size=112,
            max_objects=3,
            tasks=("detection",),
            one_kind_per_scene=True,
        )
    )
    kinds = lambda s: {i.phrase for i in s.instances}  # noqa: E731
    assert all(len(kinds(s)) == 1 for s in one)
    assert any(len(kinds(s)) > 1 for s in mixed)  # the default still mixes kinds
    # scenes of 1, 2 and 3 objects all occur, and each detection question asks for the one kind
    # present (plus, sometimes, an absent kind), so its answer lists every object in the image
    assert {len(s.instances) for s in one} == {1, 2, 3}
    for s in one:
        present = [p for p in s.phrases if s.instances_of(p)]
        assert len(present) == 1 and len(s.instances_of(present[0])) == len(s.instances)


def test_synthetic_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="no task \\['layout'\\]"):
        synthetic.generate(tmp_path, num_images=1, seed=0, tasks=("detection", "layout"))


def test_prepared_synthetic_data_follows_the_config(tmp_path):
    from rlsys.config import DataConfig
    from rlsys.data.prepare import prepare_data_path

    cfg = DataConfig(synthetic_train_images=5, synthetic_image_size_px=64, tasks=["detection"])
    p = prepare_data_path(cfg, tmp_path)
    first = p.read_text()
    assert {json.loads(l)["task"] for l in first.splitlines()} == {"detection"}
    assert prepare_data_path(cfg, tmp_path).read_text() == first  # same settings: reused
    mtime = p.stat().st_mtime_ns
    prepare_data_path(cfg, tmp_path)
    assert p.stat().st_mtime_ns == mtime
    # other settings: regenerated, not silently reused
    p2 = prepare_data_path(cfg.model_copy(update={"synthetic_train_images": 7}), tmp_path)
    assert len(p2.read_text().splitlines()) == 7


def test_pointing_without_masks_is_refused_unless_point_in_box_is_chosen(tmp_path):
    import dataclasses

    from rlsys.config import ConfigError, RewardConfig
    from rlsys.data.prepare import check_point_masks

    samples = load_jsonl(synthetic.generate(tmp_path, num_images=30, seed=2, tasks=("pointing", "gui", "detection")))
    pointing = [k for k, s in enumerate(samples) if s.task == "pointing"]
    assert pointing and all(i.mask is not None for k in pointing for i in samples[k].instances)
    assert check_point_masks(samples, RewardConfig()) == 0  # every pointing sample has its masks
    k = pointing[1]
    s = samples[k]
    samples[k] = dataclasses.replace(s, instances=[dataclasses.replace(i, mask=None) for i in s.instances])
    with pytest.raises(
        ConfigError,
        match=rf"1 pointing sample\(s\) have no masks \(first: '{s.id}' at .*train.jsonl:\d+\).*points_without_masks=box",
    ):
        check_point_masks(samples, RewardConfig())
    assert check_point_masks(samples, RewardConfig(points_without_masks="box")) == 1
    assert check_point_masks(samples, RewardConfig(sam_checkpoint="/models/sam.pth")) == 0  # SAM makes the masks
    # gui samples are point-in-box by definition: never refused
    gui = [
        dataclasses.replace(s, instances=[dataclasses.replace(i, mask=None) for i in s.instances])
        for s in samples
        if s.task == "gui"
    ]
    assert gui and check_point_masks(gui, RewardConfig()) == 0
