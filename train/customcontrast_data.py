"""CustomContrast training data: views of subjects with segmentation masks, and an order that keeps views together.

Folder layout, turned into a checked manifest by ``python -m train.prepare_manifest DATA --out
DATA/manifest.jsonl --method customcontrast``::

    DATA/SUBJECT/VIEW.png          one view (frame) of the subject SUBJECT (any size)
    DATA/SUBJECT/VIEW_mask.png     its segmentation mask, white on the subject, the view's size (required)
    DATA/SUBJECT/VIEW.txt          optional caption with the placeholder word (default "a photo of <placeholder>")

A hand-written manifest has rows ``{"subject": "cat_07", "image": ..., "mask": ..., "caption": ...}``. Each row
is checked on its own (files exist, the mask has the image's size and is not empty) and the rows together: a
subject with fewer than two views is refused (MACL's positives are other views of the same subject), with the
manifest lines of its rows.

Each sample is one view: the segmented view (white outside the mask, as CLIP Hierarchical Encode prepares a
subject) goes to the MFI encoder, the view itself (centre crop, resized) is the denoising target, and its mask
is the location target of L_loc. ``SubjectViewStream`` is the sample order: each epoch visits every subject
once (seeded permutation) with ``views`` of its views in consecutive stream positions, so that whenever the
global batch is a multiple of ``views``, every subject drawn in a global batch (and in each micro-step's
gathered batch) has ``views`` views there. A subject's views rotate through a seeded permutation of its rows
from epoch to epoch, so every row is used within ceil(rows / views) epochs.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from image_ops.subject_preprocess import MASK_THRESHOLD

from .anylogo_data import load_mask, load_rgb, mask_bounds
from .distributed import mix_seed
from .manifest import FieldSpec, ManifestSchema
from .prepare_manifest import Companion, FolderLayout

MIN_VIEWS = 2


def check_view(row: dict, sizes: dict) -> list[str]:
    if not str(row.get("subject", "")).strip():
        return ["subject must name the subject the view belongs to (a non-empty id)"]
    if mask_bounds(load_mask(row["mask"])) is None:
        return [f"mask {Path(row['mask']).name!r} is empty (no pixel above {MASK_THRESHOLD})"]
    return []


def check_subject_groups(rows: list[dict]) -> dict[int, list[str]]:
    """{position: problems} for the rows of subjects with fewer than MIN_VIEWS views."""
    by_subject = defaultdict(list)
    for i, row in enumerate(rows):
        by_subject[str(row["subject"])].append(i)
    refused = {}
    for subject, members in by_subject.items():
        if len(members) < MIN_VIEWS:
            where = ", ".join(f"line {rows[i]['_line']}" if "_line" in rows[i] else str(rows[i].get("id", "?"))
                              for i in members)
            for i in members:
                refused[i] = [f"subject {subject!r} has {len(members)} view ({where}); CustomContrast needs at least "
                              f"{MIN_VIEWS} views of every subject (the other views are MACL's positives)"]
    return refused


MANIFEST_SCHEMA = ManifestSchema(
    fields={"subject": FieldSpec("text"), "image": FieldSpec("image"), "mask": FieldSpec("mask"),
            "caption": FieldSpec("text", False)},
    same_size=(("image", "mask"),), row_check=check_view, group_check=check_subject_groups)

FOLDER_LAYOUT = FolderLayout("image", (
    Companion("mask", ("_mask.png",), "path", required=True),
    Companion("caption", (".txt",), "text"),
), source_field="subject")


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """[C, H, W] → [C, size, size]: the centred square of the shorter side, resized (antialiased bilinear)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side]
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(0, 1)


class ViewDataset(torch.utils.data.Dataset):
    """Items: the view (full size), its mask, the caption, the subject's integer id and the row index."""

    def __init__(self, rows: list[dict], placeholder: str):
        self.rows = rows
        self.subjects = sorted({str(r["subject"]) for r in rows})
        self.subject_index = {s: i for i, s in enumerate(self.subjects)}
        self.placeholder = placeholder

    def __len__(self) -> int:
        return len(self.rows)

    def caption(self, index: int) -> str:
        return self.rows[index].get("caption") or f"a photo of {self.placeholder}"

    def subject_of(self, index: int) -> int:
        return self.subject_index[str(self.rows[index]["subject"])]

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        return {"index": index, "image": load_rgb(row["image"]), "mask": load_mask(row["mask"]),
                "caption": self.caption(index), "subject": self.subject_of(index)}


def collate_views(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in items[0]}


class SubjectViewStream:
    """The global sample order: per epoch a seeded permutation of the subjects, ``views`` views of each in a row.

    ``index_at(position)`` is a pure function of the position (and seed), so any process split and a resumed
    run read the same order. Epoch e of subject s takes views ``perm_s[(e*views + k) mod n_s]`` (k < views), a
    seeded permutation of its rows fixed for the run: consecutive epochs rotate through all of them.
    """

    def __init__(self, subject_of_rows: list[int], views: int, seed: int, shuffle: bool = True):
        if views < MIN_VIEWS:
            raise ValueError(f"views_per_subject must be at least {MIN_VIEWS}, got {views}")
        members = defaultdict(list)
        for index, subject in enumerate(subject_of_rows):
            members[subject].append(index)
        self.subjects = sorted(members)
        self.views, self.seed, self.shuffle = views, seed, shuffle
        self.members = {}
        for s in self.subjects:
            rows = members[s]
            if len(rows) < MIN_VIEWS:
                raise ValueError(f"subject {s} has {len(rows)} view; every subject needs {MIN_VIEWS}")
            gen = torch.Generator().manual_seed(mix_seed(seed, "views", s))
            self.members[s] = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()] if shuffle \
                else rows
        self.epoch_length = len(self.subjects) * views
        self._epoch, self._order = None, None

    def check_split(self, batch_size: int, per_micro_step: int) -> None:
        if batch_size % self.views or per_micro_step % self.views:
            raise ValueError(f"batch_size ({batch_size}) and the samples of one micro-step over all processes "
                             f"(micro_batch_size x processes = {per_micro_step}) must be multiples of "
                             f"views_per_subject ({self.views}), so each subject's views share a contrastive batch")

    def subject_order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(mix_seed(self.seed, "subjects", epoch))
                self._order = [self.subjects[i] for i in torch.randperm(len(self.subjects), generator=gen).tolist()]
            else:
                self._order = list(self.subjects)
            self._epoch = epoch
        return self._order

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        slot, k = divmod(offset, self.views)
        rows = self.members[self.subject_order(epoch)[slot]]
        # views of one subject within an epoch are distinct when it has at least ``views`` rows
        return rows[(epoch * self.views + k) % len(rows)]
