"""Build a JSONL manifest from a folder: one row per primary image, companions found by file-name suffix.

A ``FolderLayout`` says which field holds the primary image and which companion files belong to it, by suffix
on the primary file's stem: ``cat.png`` + ``cat.txt`` (caption, read inline as text) + ``cat_mask.png`` (a path)
+ ``cat_box.json`` (read inline as JSON). Files that are companions are never primaries themselves. A layout
with a ``source_field`` records the first sub-folder of each primary (``logos/a.png`` → ``"logos"``) there. A
primary without a required companion is skipped and listed with the reason. Methods publish their layout as
``TrainingMethod.folder_layout``; with ``--method`` every row is also checked against that trainer's manifest
schema (sizes, regions…) and rows that would fail are skipped with the reasons, so the trainer accepts the file.

    python -m train.prepare_manifest DATA_FOLDER --out DATA_FOLDER/manifest.jsonl --method finetune
    python -m train.prepare_manifest DATA --out m.jsonl --primary scene \\
        --companion mask=_mask.png:path:required --companion caption=.txt:text
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from model_patches.weight_files import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
COMPANION_KINDS = ("path", "text", "json")


@dataclass(frozen=True)
class Companion:
    field: str
    suffixes: tuple[str, ...]     # alternatives appended to the primary's stem, e.g. ("_mask.png", "_mask.jpg")
    kind: str = "path"            # "path": the file's path goes in the row; "text": its stripped content;
    required: bool = False        # "json": its content parsed as JSON

    def __post_init__(self):
        if self.kind not in COMPANION_KINDS:
            raise ValueError(f"companion kind must be one of {COMPANION_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class FolderLayout:
    primary: str = "image"
    companions: tuple[Companion, ...] = ()
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    source_field: str | None = None  # field that gets the primary's first sub-folder name (if it has one)


def _is_companion(path: Path, layout: FolderLayout) -> bool:
    # a suffix like "_mask.png" marks a companion; one like ".txt" only swaps the extension, and such files are
    # never primaries anyway
    return any(path.name.endswith(s) for c in layout.companions for s in c.suffixes if not s.startswith("."))


def build_rows(folder, layout: FolderLayout, relative_to=None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, skipped) for every primary image under ``folder`` (recursive, sorted). Paths in the rows are
    relative to ``relative_to`` (the manifest's folder; default ``folder``); skipped = (path, reason)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    base = Path(relative_to).resolve() if relative_to is not None else folder
    rows, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower() not in layout.extensions or _is_companion(path, layout):
            continue
        relative = path.relative_to(folder)
        row, problems = {"id": str(relative.with_suffix("")), layout.primary: os.path.relpath(path, base)}, []
        if layout.source_field and len(relative.parts) > 1:
            row[layout.source_field] = relative.parts[0]
        for comp in layout.companions:
            found = next((path.with_name(path.stem + s) for s in comp.suffixes
                          if path.with_name(path.stem + s).is_file()), None)
            if found is None:
                if comp.required:
                    problems.append(f"no {comp.field} file ({' or '.join(path.stem + s for s in comp.suffixes)})")
                continue
            if comp.kind == "path":
                row[comp.field] = os.path.relpath(found, base)
                continue
            text = found.read_text(encoding="utf-8").strip()
            try:
                row[comp.field] = json.loads(text) if comp.kind == "json" else text
            except json.JSONDecodeError as e:
                problems.append(f"{found.name} is not valid JSON ({e.msg})")
        if problems:
            skipped.append((str(path), "; ".join(problems)))
        else:
            rows.append(row)
    return rows, skipped


def write_manifest(rows: list[dict], out) -> Path:
    """Write rows as JSONL atomically (temporary file, then rename)."""
    out = Path(out)
    with atomic_write(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def parse_companion(text: str) -> Companion:
    """``field=suffix[,suffix…][:path|text|json][:required]`` → Companion."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--companion expects field=suffix[:path|text|json][:required], got {text!r}")
    parts = rest.split(":")
    flags = set(parts[1:])
    unknown = flags - {*COMPANION_KINDS, "required"}
    if unknown:
        raise ValueError(f"--companion {text!r}: unknown flag(s) {sorted(unknown)}")
    kind = next((k for k in ("text", "json") if k in flags), "path")
    return Companion(name, tuple(parts[0].split(",")), kind, "required" in flags)


def _method(method: str):
    module = importlib.import_module(f"train.{method}")
    cls = getattr(module, "METHOD", None)
    if getattr(cls, "folder_layout", None) is None:
        raise ValueError(f"train.{method} publishes no folder layout; give --primary/--companion instead")
    return cls


def check_rows(rows: list[dict], schema, root) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows the trainer will accept, (id, reasons) of the others), checked as the trainer checks its manifest.
    Fields the schema's row check derives (e.g. a region box from a mask) are written into the kept rows."""
    from .manifest import check_row

    kept, skipped, sizes = [], [], {}
    for row in rows:
        resolved, problems = check_row(row, schema, Path(root), sizes)
        if problems:
            skipped.append((row.get("id", "?"), "; ".join(problems)))
        else:
            kept.append({**row, **{k: v for k, v in resolved.items() if k not in row}})
    if schema.group_check is not None and kept:
        refused = schema.group_check(kept)
        skipped += [(kept[i].get("id", "?"), "; ".join(refused[i])) for i in sorted(refused)]
        kept = [r for i, r in enumerate(kept) if i not in refused]
    return kept, skipped


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare_manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--out", required=True, help="manifest file to write (.jsonl)")
    parser.add_argument("--method", help="use this trainer's folder layout and row checks (e.g. finetune, anylogo)")
    parser.add_argument("--primary", default="image", help="field of the primary image")
    parser.add_argument("--companion", action="append", default=[], help="field=suffix[:path|text|json][:required]")
    args = parser.parse_args(argv)
    try:
        method = _method(args.method) if args.method else None
        layout = (method.folder_layout if method else
                  FolderLayout(args.primary, tuple(parse_companion(c) for c in args.companion)))
        rows, skipped = build_rows(args.folder, layout, relative_to=Path(args.out).parent)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if method is not None:
        rows, rejected = check_rows(rows, method.manifest_schema, Path(args.out).parent)
        skipped += rejected
    write_manifest(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}; skipped {len(skipped)}")
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(cli())
