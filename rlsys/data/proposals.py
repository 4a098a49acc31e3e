"""Merge a proposal network's boxes into a dataset, for ``model.vocabulary=chatrex``.

ChatRex answers with indices into candidate boxes, which come from a proposal source (its
Universal Proposal Network, any open-set detector, or boxes a person drew). A sample carries them
in its record's ``proposals`` field; this tool puts them there::

    python -m rlsys.data.proposals --data train.jsonl --proposals boxes.jsonl --out train_with_proposals.jsonl

``boxes.jsonl`` holds one line per image: ``{"image": "images/0001.png", "boxes": [[x0, y0, x1,
y1], ...]}`` in that image's pixels, the ``image`` written as in the dataset's records (or
``{"id": ...}`` for one record). Every record must find its boxes: one without is an error naming
its line, as is a box outside its image (checked by the dataset loader on the merged record).
Boxes are kept in the file's order, so their indices are the proposal network's (often by score).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlsys.data.images import check_images
from rlsys.data.samples import DataError, Sample, jsonl_records


def read_boxes(path) -> tuple[dict, dict]:
    """``(by_image, by_id)`` from a boxes file; a bad line raises ``DataError`` naming it."""
    by_image, by_id = {}, {}
    for where, rec in jsonl_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("boxes"), list) or not ("image" in rec or "id" in rec):
            raise DataError(f'{where}: expected {{"image": ... or "id": ..., "boxes": [[x0, y0, x1, y1], ...]}}')
        key, table = (str(rec["image"]), by_image) if "image" in rec else (str(rec["id"]), by_id)
        if key in table:
            raise DataError(f"{where}: boxes for {key!r} are given twice")
        table[key] = rec["boxes"]
    return by_image, by_id


def merge(data_path, boxes_path, out_path) -> int:
    """Write ``data_path``'s records with their proposals to ``out_path`` (atomically); returns
    the number of records."""
    data_path, out_path = Path(data_path), Path(out_path)
    by_image, by_id = read_boxes(boxes_path)
    lines, samples = [], []
    for where, rec in jsonl_records(data_path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        boxes = by_id.get(str(rec.get("id"))) if str(rec.get("id")) in by_id else by_image.get(str(rec.get("image")))
        if boxes is None:
            raise DataError(f"{where} (id {rec.get('id')!r}): {boxes_path} has no boxes for image {rec.get('image')!r}")
        rec["proposals"] = boxes
        # every box inside its image, and the rest of the record valid
        samples.append(Sample.from_dict(rec, where, root=data_path.parent))
        lines.append(json.dumps(rec))
    if not lines:
        raise DataError(f"{data_path}: holds no records")
    unusable = check_images(samples)  # the image exists, reads and has the record's size
    if unusable:
        raise DataError(
            f"{len(unusable)} record(s) cannot be used:\n  "
            + "\n  ".join(f"{s.source}, id {s.id!r}: {why}" for s, why in unusable[:10])
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_path)
    return len(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlsys.data.proposals", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the dataset (JSONL records)")
    p.add_argument("--proposals", required=True, help='JSONL: {"image" or "id": ..., "boxes": [[x0, y0, x1, y1], ...]}')
    p.add_argument("--out", required=True, help="where the records with their proposals go")
    a = p.parse_args(argv)
    try:
        n = merge(a.data, a.proposals, a.out)
    except DataError as exc:
        p.exit(2, f"error: {exc}\n")
    print(f"{n} records with proposals -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
