"""Read the points users type or wire in from a points-editor node, and check them against the images.

Accepted text (all coordinates are x, y with x to the right and y downwards from the top-left corner):

* JSON as the common ComfyUI points editors write it: KJNodes' *Points Editor* outputs
  ``[{"x": 120, "y": 80}, ...]`` (and ``""``, a JSON empty string, when no negative point was placed);
  also a single ``{"x": .., "y": ..}``, pairs ``[[120, 80], [300, 210]]`` or one pair ``[120, 80]``.
* Plain text: ``120,80; 300,210`` — pairs separated by ``;`` or new lines, the two numbers by a comma or
  spaces, optional brackets ``(120, 80)``.
* Per image of a batch: a JSON list of per-image lists, ``[[{"x":1,"y":2}], [{"x":3,"y":4}, ...]]`` or
  ``[[[1,2]], [[3,4],[5,6]]]``, or plain text with images separated by ``|``: ``1,2 | 3,4; 5,6``. The number of
  lists must equal the batch size; an empty list is allowed (no point on that image).

Anything else is shared by every image of the batch. Empty text means no point.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

PIXELS = "pixels"
FRACTIONS = "fractions"  # 0..1 of the width and height, e.g. KJNodes' Points Editor with normalize on

Point = tuple[float, float]


class PointsError(ValueError):
    """Point text that cannot be read, or points that do not fit the images."""


@dataclass(frozen=True)
class PointSpec:
    """Points as written: one list shared by the batch, or one list per image."""
    lists: tuple[tuple[Point, ...], ...]
    per_image: bool

    def for_batch(self, batch: int, role: str) -> list[tuple[Point, ...]]:
        if not self.per_image:
            return [self.lists[0]] * batch
        if len(self.lists) != batch:
            raise PointsError(f"the {role} points give {len(self.lists)} per-image lists, but the batch has "
                              f"{batch} images: give one list per image, or a single list shared by all")
        return list(self.lists)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"^[\(\[]?\s*({_NUMBER})\s*(?:,\s*|\s+)({_NUMBER})\s*[\)\]]?$")


def parse_points(text: str, role: str = "positive") -> PointSpec:
    """Parse one points input (see the module doc for the formats); ``role`` names it in error messages."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise PointsError(f"the {role} points must be text, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        return PointSpec(((),), per_image=False)
    if stripped[0] in "[{\"":
        return _from_json(stripped, role)
    return _from_plain_text(stripped, role)


def _from_plain_text(text: str, role: str) -> PointSpec:
    chunks = text.split("|")
    lists = []
    for image_index, chunk in enumerate(chunks, start=1):
        points = []
        for item in re.split(r"[;\n]", chunk):
            item = item.strip()
            if not item:
                continue
            match = _PAIR.match(item)
            where = f"image {image_index}'s list" if len(chunks) > 1 else "the list"
            if match is None:
                raise PointsError(f"cannot read the {role} point {item!r} in {where}: expected 'x,y' "
                                  "(e.g. '120,80; 300,210')")
            points.append(_finite(float(match.group(1)), float(match.group(2)), role, f"point {item!r}"))
        lists.append(tuple(points))
    return PointSpec(tuple(lists), per_image=len(chunks) > 1)


def _from_json(text: str, role: str) -> PointSpec:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PointsError(f"the {role} points look like JSON but do not parse: {error.msg} at character "
                          f"{error.pos} of {text[:80]!r}") from None
    if isinstance(value, str):  # a points editor that JSON-encodes its (possibly empty) string input
        return parse_points(value, role)
    if isinstance(value, dict) or _is_pair(value):
        return PointSpec(((_point(value, role, "the point"),),), per_image=False)
    if not isinstance(value, list):
        raise PointsError(f"the {role} points JSON must be a list of points, got {type(value).__name__}")
    if value and all(isinstance(item, list) and not _is_pair(item) for item in value):
        lists = tuple(tuple(_point(p, role, f"point {k} of image {i}") for k, p in enumerate(item, start=1))
                      for i, item in enumerate(value, start=1))
        return PointSpec(lists, per_image=True)
    return PointSpec((tuple(_point(p, role, f"point {k}") for k, p in enumerate(value, start=1)),),
                     per_image=False)


def _is_pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _point(value, role: str, where: str) -> Point:
    if isinstance(value, dict):
        if not {"x", "y"} <= value.keys() or not (_is_number(value["x"]) and _is_number(value["y"])):
            raise PointsError(f"{where} of the {role} points is {json.dumps(value)[:60]}: expected "
                              '{"x": number, "y": number}')
        return _finite(float(value["x"]), float(value["y"]), role, where)
    if _is_pair(value):
        return _finite(float(value[0]), float(value[1]), role, where)
    raise PointsError(f"{where} of the {role} points is {json.dumps(value)[:60]}: expected "
                      '{"x": number, "y": number} or [x, y]')


def _finite(x: float, y: float, role: str, where: str) -> Point:
    if not (math.isfinite(x) and math.isfinite(y)):
        raise PointsError(f"{where} of the {role} points has a non-finite coordinate ({x}, {y})")
    return x, y


def to_pixels(points: tuple[Point, ...], width: int, height: int, units: str, role: str,
              image_index: int) -> tuple[Point, ...]:
    """Convert to pixel coordinates and refuse any point outside the image (``image_index`` is 1-based)."""
    if units not in (PIXELS, FRACTIONS):
        raise PointsError(f"unknown coordinate units {units!r}: expected {PIXELS!r} or {FRACTIONS!r}")
    out = []
    for k, (x, y) in enumerate(points, start=1):
        if units == FRACTIONS:
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise PointsError(f"{role} point {k} (x={x:g}, y={y:g}) is outside image {image_index}: "
                                  "fractional coordinates must lie in 0..1")
            # 1.0 is the far edge: it belongs to the last pixel
            x, y = min(x * width, width - 0.5), min(y * height, height - 0.5)
        elif not (0.0 <= x < width and 0.0 <= y < height):
            raise PointsError(f"{role} point {k} (x={x:g}, y={y:g}) is outside image {image_index}, which is "
                              f"{width}x{height} (width x height): x must lie in [0, {width}) and y in "
                              f"[0, {height})")
        out.append((x, y))
    return tuple(out)


def batch_points(positive_text: str, negative_text: str, batch: int, width: int, height: int,
                 units: str = PIXELS) -> list[tuple[tuple[Point, ...], tuple[Point, ...]]]:
    """(positives, negatives) in pixels for every image of a batch; every image needs a positive point."""
    positive_spec = parse_points(positive_text, "positive")
    positives = positive_spec.for_batch(batch, "positive")
    negatives = parse_points(negative_text, "negative").for_batch(batch, "negative")
    out = []
    for index, (pos, neg) in enumerate(zip(positives, negatives), start=1):
        if not pos:
            where = f"image {index} has" if positive_spec.per_image else "there is"
            raise PointsError(f"{where} no positive point: give at least one point on the subject to select")
        out.append((to_pixels(pos, width, height, units, "positive", index),
                    to_pixels(neg, width, height, units, "negative", index)))
    return out
