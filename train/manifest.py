"""Training manifests: JSONL rows checked against a method's schema before any training starts.

One JSON object per line. Each method declares which fields it reads and what they are (an image, a mask,
another file, text, a number, a list), which image/mask fields must share a size, and optionally a
``row_check`` for what involves several fields (a box inside its image, a region that is not empty). Paths are
relative to the manifest's folder (absolute paths are kept). Every bad row is named by its line (and ``id`` when
the row has one) with every problem found, e.g. ``line 7 (id 'cat_02'): mask 'masks/cat_02.png' is 64x48 but
image 'images/cat_02.png' is 64x64``. With ``on_bad_row="stop"`` any bad row stops the run with that list; with
``"skip"`` the rows are left out and the report says which and why.

Validated rows are plain dicts: file fields hold absolute paths, ``_line`` the 1-based manifest line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("image", "mask", "file", "text", "number", "list")
SIZED = ("image", "mask")


class ManifestError(ValueError):
    """The manifest is missing or unreadable, has bad rows under on_bad_row=stop, or has no usable row."""


@dataclass(frozen=True)
class FieldSpec:
    kind: str
    required: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"field kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ManifestSchema:
    """What a method reads from each row; ``same_size`` lists groups of image/mask fields of equal size.

    ``row_check(row, sizes) -> problems`` runs on rows whose fields passed (file fields already absolute,
    ``sizes`` = {image/mask field: (width, height)}); it may complete the row with derived fields.
    """

    fields: dict[str, FieldSpec]
    same_size: tuple[tuple[str, ...], ...] = ()
    row_check: Callable[[dict, dict], list[str]] | None = None
    # ``group_check(rows) -> {position in rows: problems}`` runs once on all rows that passed, for conditions
    # over several rows (CustomContrast: every subject needs two views); the rows it names become bad rows
    group_check: Callable[[list[dict]], dict[int, list[str]]] | None = None

    def __post_init__(self):
        for group in self.same_size:
            for name in group:
                if name not in self.fields or self.fields[name].kind not in SIZED:
                    raise ValueError(f"same_size names {name!r}, which is not an image or mask field")


@dataclass
class BadRow:
    line: int
    row_id: str | None
    problems: list[str]

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (id {self.row_id!r})" if self.row_id is not None else "")
        return f"{where}: " + "; ".join(self.problems)


@dataclass
class ManifestReport:
    path: Path
    rows: list[dict]
    bad_rows: list[BadRow] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        text = f"{self.path}: {len(self.rows)} usable rows, {len(self.bad_rows)} bad"
        lines = [f"  {b}" for b in self.bad_rows[:limit]]
        if len(self.bad_rows) > limit:
            lines.append(f"  … and {len(self.bad_rows) - limit} more")
        return "\n".join([text] + lines)

    def to_json(self) -> dict:
        return {"manifest": str(self.path), "usable_rows": len(self.rows),
                "bad_rows": [{"line": b.line, "id": b.row_id, "problems": b.problems} for b in self.bad_rows]}


def _image_size(path: Path, cache: dict) -> tuple[int, int]:
    """(width, height) from the file header; raises ValueError for a file Pillow cannot identify."""
    if path not in cache:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                cache[path] = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot be read as an image ({e.__class__.__name__})") from None
    return cache[path]


def check_row(row, schema: ManifestSchema, root: Path, size_cache: dict) -> tuple[dict, list[str]]:
    """(resolved row, problems) for one parsed manifest row."""
    if not isinstance(row, dict):
        return {}, [f"expected a JSON object, got {type(row).__name__}"]
    out, problems, sizes = dict(row), [], {}
    for name, spec in schema.fields.items():
        value = row.get(name)
        if value is None:
            if spec.required:
                problems.append(f"missing field {name!r}")
            continue
        if spec.kind in ("image", "mask", "file"):
            if not isinstance(value, str) or not value:
                problems.append(f"{name} must be a file path, got {value!r}")
                continue
            path = (root / value).resolve()
            if not path.is_file():
                problems.append(f"{spec.kind} file {value!r} ({name}) does not exist")
                continue
            out[name] = str(path)
            if spec.kind in SIZED:
                try:
                    sizes[name] = _image_size(path, size_cache)
                except ValueError as e:
                    problems.append(f"{spec.kind} file {value!r} ({name}) {e}")
        elif spec.kind == "text" and not isinstance(value, str):
            problems.append(f"{name} must be text, got {value!r}")
        elif spec.kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{name} must be a number, got {value!r}")
        elif spec.kind == "list" and not isinstance(value, list):
            problems.append(f"{name} must be a list, got {value!r}")
    for group in schema.same_size:
        present = [n for n in group if n in sizes]
        for other in present[1:]:
            if sizes[other] != sizes[present[0]]:
                (w0, h0), (w1, h1) = sizes[present[0]], sizes[other]
                problems.append(f"{schema.fields[other].kind} {row[other]!r} ({other}) is {w1}x{h1} but "
                                f"{schema.fields[present[0]].kind} {row[present[0]]!r} ({present[0]}) is "
                                f"{w0}x{h0}")
    if not problems and schema.row_check is not None:
        problems += schema.row_check(out, sizes)
    return out, problems


def read_manifest(path, schema: ManifestSchema, on_bad_row: str = "stop") -> ManifestReport:
    """Every row of ``path`` checked against ``schema``; ManifestError per ``on_bad_row`` ("stop"/"skip")."""
    if on_bad_row not in ("stop", "skip"):
        raise ValueError(f"on_bad_row must be 'stop' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    report, size_cache = ManifestReport(path=path, rows=[]), {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad_rows.append(BadRow(line_no, None, [f"not valid JSON ({e.msg} at column {e.colno})"]))
                continue
            resolved, problems = check_row(row, schema, path.parent, size_cache)
            row_id = row.get("id") if isinstance(row, dict) else None
            if problems:
                report.bad_rows.append(BadRow(line_no, None if row_id is None else str(row_id), problems))
            else:
                resolved["_line"] = line_no
                report.rows.append(resolved)
    if schema.group_check is not None and report.rows:
        refused = schema.group_check(report.rows)
        for i in sorted(refused):
            row = report.rows[i]
            report.bad_rows.append(BadRow(row["_line"], None if row.get("id") is None else str(row["id"]),
                                          refused[i]))
        report.bad_rows.sort(key=lambda b: b.line)
        report.rows = [r for i, r in enumerate(report.rows) if i not in refused]
    if report.bad_rows and on_bad_row == "stop":
        raise ManifestError("bad manifest rows (set on_bad_row=skip to leave them out):\n" + report.summary())
    if not report.rows:
        raise ManifestError(f"no usable rows in the manifest\n{report.summary()}")
    return report
