"""SAM masks from ground-truth boxes, for the point-in-mask reward, and from predicted point
sets, for GETok's mask answers.

Why: the pointing reward (Rex-Omni paper eq. 5) scores a point 1 when it falls inside the GT
instance's *mask*; a box is a poor stand-in (a point on the background corner of a tilted
object's box is not on the object). Many detection / pointing datasets carry boxes but no
masks, so, as the paper's data engine did, we prompt SAM with each GT box (or GT point, when a
pointing dataset has no box) and use the predicted mask as the GT mask.

``SamMaskSource(checkpoint_dir)`` is the ``mask_source`` of :func:`rewards.scorer.score`: the
scorer calls ``mask_source(sample)`` with the whole sample and expects one ``HxW`` mask per
instance of ``sample.instances``, in order; it keeps the sample's own mask wherever an instance
has one. We therefore return the instance's own mask (decoded) for those and run SAM only for
the others.

``mask_source.masks_from_points(sample, point_sets)`` decodes a GETok mask answer: each
predicted set of grid points becomes the mask SAM draws from those points as positive prompts
(GETok paper, section 3.2.1), for the mask IoU reward (:mod:`rewards.mask`).

Cost control, since reward workers score every rollout of a group against the same image:

- masks are cached (LRU) per (image path and size, prompt rounded to 0.1 px), so the G rollouts of one
  prompt and later epochs over the same image do not re-run SAM;
- on a miss, the image is encoded once per call and every missing box of that image goes
  through the (cheap) prompt encoder + mask decoder in one batched forward.

Torch and transformers are imported inside the class: ``import rewards`` must stay free of
torch (a test checks), and only workers configured with a SAM checkpoint pay for it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rewards import geometry as geo
from rewards.mask import as_point_set
from rlsys.data.images import open_rgb


class SamMaskSource:
    """``mask_source(sample) -> list[np.ndarray]``: one ``(height, width)`` bool mask per instance.

    ``checkpoint_dir``: a local directory holding a ``transformers`` SAM checkpoint
    (``SamModel`` weights + ``config.json`` and the ``SamProcessor``'s config, as written by
    ``save_pretrained``); nothing is downloaded. ``cache_size``: how many masks the
    LRU cache keeps (0 disables it). ``multimask``: ask SAM for its 3 candidate masks and keep
    the one with the highest predicted IoU (SAM's advice for ambiguous single-point prompts);
    the default, one mask per prompt, is what SAM recommends for box prompts.

    Counters, for logging and tests: ``forward_calls`` (image encoder passes, one per image per
    call that missed the cache), ``decoder_calls`` (batched prompt/mask-decoder passes),
    ``cache_hits`` and ``cache_misses`` (per instance prompt).
    """

    def __init__(self, checkpoint_dir, *, device: str = "cpu", cache_size: int = 1024, multimask: bool = False):
        path = Path(checkpoint_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"SAM checkpoint directory {str(path)!r} does not exist (expected a local "
                "directory written by SamModel/SamProcessor.save_pretrained)"
            )
        # Check the files ourselves: from_pretrained's errors on a wrong directory talk about the
        # Hub and model ids, which misleads when the path is simply not a SAM checkpoint.
        cfg_file = path / "config.json"
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{str(path)!r} is not a SAM checkpoint: cannot read {cfg_file.name} ({exc})") from None
        if model_type != "sam":
            raise ValueError(
                f"{str(path)!r} is not a SAM checkpoint: config.json has model_type {model_type!r}, expected 'sam'"
            )
        # transformers 5 writes processor_config.json; Hub SAM checkpoints ship preprocessor_config.json.
        if not any((path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            raise ValueError(
                f"{str(path)!r} is not a SAM checkpoint: no processor_config.json or "
                "preprocessor_config.json (save the SamProcessor next to the model)"
            )
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0, got {cache_size!r}")

        import torch
        from transformers import SamModel, SamProcessor

        self._torch = torch
        try:
            self.model = SamModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = SamProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the SAM checkpoint in {str(path)!r}: {exc}") from exc
        self.checkpoint_dir = str(path)
        self.device = torch.device(device)
        self.multimask = bool(multimask)
        self.cache_size = cache_size
        # Values are COCO RLE, not HxW arrays: 1024 masks of a 1-megapixel image would hold
        # 1 GB as bool arrays, and every reward worker of a node keeps its own cache.
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self.forward_calls = 0
        self.decoder_calls = 0
        self.cache_hits = 0
        self.cache_misses = 0

    # -- the mask source -----------------------------------------------------------------

    def __call__(self, sample) -> list[np.ndarray]:
        h, w = int(sample.height), int(sample.width)
        image_key = os.path.abspath(os.fspath(sample.image))
        out: list[np.ndarray | None] = [None] * len(sample.instances)
        keys: list[tuple | None] = [None] * len(sample.instances)
        for k, inst in enumerate(sample.instances):
            if inst.mask is not None:
                # The scorer keeps the sample's own mask here; return it so the list stays one
                # mask per instance without running SAM for nothing.
                out[k] = geo.decode_masks([inst.mask], h, w, f"instances[{k}].mask")[0]
                continue
            # The prompt is rounded *before* prompting, so a cached mask is exactly what its key
            # would compute (0.1 px is far below what SAM's 1024-px input resolves). The size is
            # in the key so a record declaring another size never reuses a mask of the wrong shape.
            if inst.box is not None:
                keys[k] = (image_key, h, w, "box", tuple(round(float(v), 1) for v in inst.box))
            elif inst.point is not None:
                keys[k] = (image_key, h, w, "point", tuple(round(float(v), 1) for v in inst.point))
            else:
                raise ValueError(
                    f"sample {sample.id!r}: instances[{k}] has neither a box nor a point to prompt SAM with"
                )
        return self._masks(sample, keys, out, h, w)

    def masks_from_points(self, sample, point_sets) -> list[np.ndarray]:
        """One ``(height, width)`` bool mask per point set: SAM prompted with the set's points,
        all positive, as GETok decodes a predicted set of grid points into a mask (section 3.2.1).

        ``point_sets``: each a flat ``(x0, y0, x1, y1, ...)`` or ``[[x, y], ...]`` in the sample's
        pixels (predictions: anything goes). A set is a set: its points are rounded to 0.1 px,
        repeats dropped and sorted before prompting (SAM's prompt tokens carry no order, and
        the cache key is then the prompt). Points that are not finite or lie outside the image are
        left out; a set with none left decodes to an empty mask without running SAM. Sets are
        batched per size through one image encoding (:meth:`_segment`) and cached like boxes."""
        h, w = int(sample.height), int(sample.width)
        image_key = os.path.abspath(os.fspath(sample.image))
        out: list[np.ndarray | None] = [None] * len(point_sets)
        keys: list[tuple | None] = [None] * len(point_sets)
        for k, raw in enumerate(point_sets):
            pts = as_point_set(raw)  # [n, 2]; anything that is not (x, y) pairs: no point
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(pts).all(1) & (pts[:, 0] >= 0) & (pts[:, 0] <= w) & (pts[:, 1] >= 0) & (pts[:, 1] <= h)
            prompt = tuple(sorted({(round(float(x), 1), round(float(y), 1)) for x, y in pts[ok]}))
            if not prompt:
                out[k] = np.zeros((h, w), dtype=bool)
                continue
            keys[k] = (image_key, h, w, "points", prompt)
        return self._masks(sample, keys, out, h, w)

    def _masks(self, sample, keys: list, out: list, h: int, w: int) -> list[np.ndarray]:
        """Fill ``out[k]`` for every ``keys[k]`` that is not None: from the cache, else from one
        :meth:`_segment` call over the misses (a key asked twice runs once)."""
        missing: dict[tuple, list[int]] = {}  # cache key -> indices
        for k, key in enumerate(keys):
            if key is None:
                continue
            rle = self._cache.get(key)
            if rle is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                out[k] = _decode(rle)
            else:
                self.cache_misses += 1
                missing.setdefault(key, []).append(k)
        if missing:
            masks = self._segment(sample, list(missing), h, w)
            for key, mask in zip(missing, masks):
                for k in missing[key]:
                    out[k] = mask
                self._remember(key, mask)
        return out  # type: ignore[return-value]

    # -- SAM -----------------------------------------------------------------------------

    def _segment(self, sample, keys: list[tuple], h: int, w: int) -> list[np.ndarray]:
        """One mask per key (all of ``sample``'s image): one image encoding, one decoder pass
        per prompt kind (boxes and points cannot share a batch: SAM pairs them one to one), and
        for point sets one per set size (a padded prompt is not the prompt alone, so a set's mask
        never depends on what else was in its batch, and a cached mask is what its key computes)."""
        torch = self._torch
        image = self._load_image(sample, h, w)
        result: list[np.ndarray | None] = [None] * len(keys)
        with torch.inference_mode():
            enc = self.processor(images=image, return_tensors="pt")
            original = enc["original_sizes"]  # [[h, w]]
            reshaped = enc["reshaped_input_sizes"]  # [[h', w']]: the image inside SAM's padded input
            emb = self.model.get_image_embeddings(enc["pixel_values"].to(self.device))
            self.forward_calls += 1
            # Prompts go into SAM's resized frame, as the processor's own normalisation does.
            scale = torch.tensor([float(reshaped[0, 1]) / w, float(reshaped[0, 0]) / h])  # (x, y)
            groups: dict[tuple, list[int]] = {}
            for i, key in enumerate(keys):
                groups.setdefault((key[3], len(key[4]) if key[3] == "points" else 0), []).append(i)
            for (kind, _), idx in groups.items():
                if kind == "box":
                    coords = (
                        torch.tensor([keys[i][4] for i in idx], dtype=torch.float32).reshape(len(idx), 2, 2) * scale
                    )
                    prompt = {"input_boxes": coords.reshape(1, len(idx), 4).to(self.device)}  # [1, n, 4]
                else:
                    # one positive point ([1, n, 1, 2]) or a set of L of them ([1, n, L, 2])
                    pts = [[keys[i][4]] if kind == "point" else list(keys[i][4]) for i in idx]
                    coords = torch.tensor(pts, dtype=torch.float32) * scale
                    prompt = {
                        "input_points": coords[None].to(self.device),
                        "input_labels": torch.ones(1, len(idx), coords.shape[1], dtype=torch.long, device=self.device),
                    }
                res = self.model(image_embeddings=emb, multimask_output=self.multimask, **prompt)
                self.decoder_calls += 1
                masks = self.processor.post_process_masks([res.pred_masks[0].float().cpu()], original, reshaped)[0]
                # masks: [n, m, H, W] bool (m = 3 with multimask, else 1): keep the mask SAM
                # predicts the highest IoU for (with m = 1, the only one).
                best = res.iou_scores[0].argmax(-1).cpu()
                chosen = masks[torch.arange(len(idx)), best].numpy().astype(bool)
                for j, i in enumerate(idx):
                    result[i] = chosen[j]
        return result  # type: ignore[return-value]

    def _load_image(self, sample, h: int, w: int):

        try:
            image = open_rgb(sample.image)
        except OSError as exc:
            raise ValueError(f"sample {sample.id!r}: cannot read image {sample.image!r} for SAM ({exc})") from None
        if image.size != (w, h):
            # The boxes are in the sample's pixels; a mask of another size would be scored
            # against the wrong pixels, so refuse rather than guess a rescale.
            raise ValueError(
                f"sample {sample.id!r}: image {sample.image!r} is {image.size[0]}x{image.size[1]} "
                f"but the sample says {w}x{h}"
            )
        return image

    # -- cache ---------------------------------------------------------------------------

    def _remember(self, key: tuple, mask: np.ndarray) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = _encode(mask)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_clear(self) -> None:
        self._cache.clear()


def _encode(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _decode(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)
