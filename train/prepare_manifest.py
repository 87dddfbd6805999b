"""Build a JSONL manifest from a folder: one row per primary image, companions found by file-name suffix.

A ``FolderLayout`` says which field holds the primary image and which companion files belong to it, by suffix
on the primary file's stem: ``cat.png`` + ``cat.txt`` (caption, read inline as text) + ``cat_mask.png`` (a path).
Files that are companions are never primaries themselves. A primary without a required companion is skipped
and listed with the reason. Methods publish their layout as ``TrainingMethod.folder_layout``.

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


@dataclass(frozen=True)
class Companion:
    field: str
    suffixes: tuple[str, ...]     # alternatives appended to the primary's stem, e.g. ("_mask.png", "_mask.jpg")
    kind: str = "path"            # "path": the file's path goes in the row; "text": its stripped content
    required: bool = False

    def __post_init__(self):
        if self.kind not in ("path", "text"):
            raise ValueError(f"companion kind must be 'path' or 'text', got {self.kind!r}")


@dataclass(frozen=True)
class FolderLayout:
    primary: str = "image"
    companions: tuple[Companion, ...] = ()
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS


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
        row, missing = {"id": str(path.relative_to(folder).with_suffix("")),
                        layout.primary: os.path.relpath(path, base)}, []
        for comp in layout.companions:
            found = next((path.with_name(path.stem + s) for s in comp.suffixes
                          if path.with_name(path.stem + s).is_file()), None)
            if found is None:
                if comp.required:
                    missing.append(f"no {comp.field} file ({' or '.join(path.stem + s for s in comp.suffixes)})")
                continue
            row[comp.field] = (found.read_text(encoding="utf-8").strip() if comp.kind == "text"
                               else os.path.relpath(found, base))
        if missing:
            skipped.append((str(path), "; ".join(missing)))
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
    """``field=suffix[,suffix…][:path|text][:required]`` → Companion."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--companion expects field=suffix[:path|text][:required], got {text!r}")
    parts = rest.split(":")
    flags = set(parts[1:])
    unknown = flags - {"path", "text", "required"}
    if unknown:
        raise ValueError(f"--companion {text!r}: unknown flag(s) {sorted(unknown)}")
    return Companion(name, tuple(parts[0].split(",")), "text" if "text" in flags else "path", "required" in flags)


def _method_layout(method: str) -> FolderLayout:
    module = importlib.import_module(f"train.{method}")
    layout = getattr(getattr(module, "METHOD", None), "folder_layout", None)
    if layout is None:
        raise ValueError(f"train.{method} publishes no folder layout; give --primary/--companion instead")
    return layout


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare_manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--out", required=True, help="manifest file to write (.jsonl)")
    parser.add_argument("--method", help="use this trainer's folder layout (e.g. finetune)")
    parser.add_argument("--primary", default="image", help="field of the primary image")
    parser.add_argument("--companion", action="append", default=[], help="field=suffix[:path|text][:required]")
    args = parser.parse_args(argv)
    try:
        layout = (_method_layout(args.method) if args.method else
                  FolderLayout(args.primary, tuple(parse_companion(c) for c in args.companion)))
        rows, skipped = build_rows(args.folder, layout, relative_to=Path(args.out).parent)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_manifest(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}; skipped {len(skipped)}")
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(cli())
