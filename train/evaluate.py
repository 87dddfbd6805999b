"""`python -m train.evaluate`: CLIP-I, CLIP-T, DINO-I and LPIPS of generated images against their subjects.

    python -m train.evaluate --manifest eval.jsonl --clip-vision clip_vit_l.safetensors \\
        --dinov2 dinov2_large.safetensors --clip-text clip_l.safetensors --out results/
    python -m train.evaluate --generated out/ --references subject/ --prompt "a photo of sks dog" ...

The scores are image_ops.similarity's, the same code as the Subject Similarity node (same numbers). Encoders are
loaded as the stock nodes load them: CLIP vision / DINOv2 files with ComfyUI's CLIP-vision loader (names are
looked up in models/clip_vision; ``--*-config`` gives ComfyUI's JSON config for other sizes), the CLIP text model
with ComfyUI's CLIP loader (type stable_diffusion), LPIPS from a local file (models/lpips or a path).

Inputs: a JSONL manifest (one generated image per row: ``generated``, ``references`` (list) or ``reference``,
optional ``prompt``, ``generated_mask``, ``reference_masks`` / ``reference_mask``, ``generated_points`` /
``reference_points`` (P3S point format; the mask is made by the pack's point-to-mask with the CLIP vision model)
and any other fields, e.g. ``subject`` or ``prompt_set`` for ``--group-by``), checked with the trainers'
manifest checks; or folders: every image of ``--generated`` scored against all of ``--references``, masks
matched by file stem.

Writes to ``--out``: results.jsonl (first line the header), results.csv (``#`` header lines), summary.json and
summary.csv (mean, std, var, count per metric, overall and per group). The header holds the metric version,
settings and each model file's sha256, so two runs are comparable. Files are written only when every row was
scored, each through a temporary file and a rename: an interrupted run leaves no truncated results.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import sys
from pathlib import Path

import torch

from image_ops import similarity as sim
from model_patches.weight_files import atomic_write

from .manifest import FieldSpec, ManifestError, ManifestSchema, read_manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESULT_FILES = ("results.jsonl", "results.csv", "summary.json", "summary.csv")


class EvaluationError(ValueError):
    """Inputs or models the evaluation cannot use; the message says what to change."""


# ---- inputs -----------------------------------------------------------------------------------------------------

def _reference_check(row: dict, sizes: dict) -> list[str]:
    root = Path(row["_root"]) if "_root" in row else Path(".")
    problems = []
    refs = row.get("references")
    if refs is None and row.get("reference") is not None:
        refs = [row["reference"]]
    if not refs:
        return ["missing reference: give 'references' (a list of image paths) or 'reference'"]
    resolved = []
    for ref in refs:
        path = (root / ref).resolve() if isinstance(ref, str) and ref else None
        if path is None or not path.is_file():
            problems.append(f"reference image {ref!r} does not exist")
        else:
            resolved.append(str(path))
    row["references"] = resolved
    masks = row.get("reference_masks")
    if masks is None and row.get("reference_mask") is not None:
        masks = [row["reference_mask"]]
    if masks is not None:
        if len(masks) not in (1, len(refs)):
            problems.append(f"{len(masks)} reference masks for {len(refs)} references; give one for all or one "
                            "per reference")
        paths = [(root / m).resolve() for m in masks if isinstance(m, str) and m]
        problems += [f"reference mask {str(p)!r} does not exist" for p in paths if not p.is_file()]
        row["reference_masks"] = [str(p) for p in paths]
    return problems


SCHEMA = ManifestSchema(fields={
    "generated": FieldSpec("image"), "references": FieldSpec("list", required=False),
    "reference": FieldSpec("image", required=False), "prompt": FieldSpec("text", required=False),
    "generated_mask": FieldSpec("mask", required=False), "reference_masks": FieldSpec("list", required=False),
    "reference_mask": FieldSpec("mask", required=False), "generated_points": FieldSpec("text", required=False),
    "reference_points": FieldSpec("text", required=False),
}, row_check=_reference_check)


def manifest_rows(path, on_bad_row: str = "stop") -> list[dict]:
    """Rows of a JSONL manifest, checked like the trainers' (paths relative to the manifest's folder)."""
    root = str(Path(path).resolve().parent)

    def check(row, sizes):
        row["_root"] = root
        return _reference_check(row, sizes)

    schema = ManifestSchema(SCHEMA.fields, row_check=check)
    try:
        rows = read_manifest(path, schema, on_bad_row).rows
    except ManifestError as e:
        raise EvaluationError(str(e)) from None
    for row in rows:
        row.pop("_root", None)
    return rows


def _images_in(folder, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the {what} folder {folder}")
    return files


def _mask_by_stem(folder, images: list[Path], what: str) -> list[str]:
    masks = {p.stem: p for p in _images_in(folder, f"{what} mask")}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise EvaluationError(f"no {what} mask for {len(missing)} images in {folder} (masks are matched by file "
                              f"name without extension): {missing[:5]}")
    return [str(masks[p.stem]) for p in images]


def folder_rows(generated, references, *, generated_masks=None, reference_masks=None, prompt=None,
                prompts_file=None) -> list[dict]:
    """Every generated image against all reference images (DreamBench layout: one folder per subject)."""
    gen, refs = _images_in(generated, "generated"), _images_in(references, "reference")
    prompts = [prompt] * len(gen) if prompt else None
    if prompts_file:
        lines = [line.strip() for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != len(gen):
            raise EvaluationError(f"{prompts_file} has {len(lines)} prompts for {len(gen)} generated images; give "
                                  "one line per generated image (in file-name order), or --prompt for all")
        prompts = lines
    gmasks = _mask_by_stem(generated_masks, gen, "generated") if generated_masks else None
    rmasks = _mask_by_stem(reference_masks, refs, "reference") if reference_masks else None
    rows = []
    for index, path in enumerate(gen):
        row = {"id": path.stem, "generated": str(path.resolve()), "references": [str(r.resolve()) for r in refs]}
        if prompts:
            row["prompt"] = prompts[index]
        if gmasks:
            row["generated_mask"] = gmasks[index]
        if rmasks:
            row["reference_masks"] = rmasks
        rows.append(row)
    return rows


def load_image(path) -> torch.Tensor:
    """[1,3,H,W] float 0..1; an image with transparency is refused (its alpha says where the subject is)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            raise EvaluationError(f"{path} has an alpha channel: save it as RGB and give the alpha as a mask file")
        array = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).movedim(-1, 0)[None]


def load_mask(path) -> torch.Tensor:
    """[1,H,W] float 0..1 from a grayscale (or RGB) mask file: white = subject."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None]


def points_mask(clip_vision, image: torch.Tensor, text: str) -> torch.Tensor:
    """The pack's P3S point-to-mask (positive points; ``text`` in the Points to Mask node's format)."""
    from image_ops.point_mask import select_subject
    from image_ops.point_parsing import PIXELS, batch_points

    if clip_vision is None:
        raise EvaluationError("points were given for a mask, but point-to-mask needs --clip-vision")
    height, width = image.shape[-2:]
    (positives, negatives), = batch_points(text, "", 1, width, height, PIXELS)
    return select_subject(clip_vision, image[0], positives, negatives)[None]


# ---- models -----------------------------------------------------------------------------------------------------

def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve(name: str, folder: str, what: str) -> Path:
    import folder_paths

    path = Path(name)
    if path.is_file():
        return path
    found = folder_paths.get_full_path(folder, name) if folder in folder_paths.folder_names_and_paths else None
    if found:
        return Path(found)
    raise EvaluationError(f"{what} file not found: {name} (neither a path nor a file in ComfyUI's models/{folder})")


def load_vision(name: str, config: str, kind: str, what: str):
    """The CLIP vision / DINOv2 model of ``--clip-vision`` / ``--dinov2``, loaded as the trainers load theirs."""
    from .base_model import BaseModelError, load_vision_encoder

    path = _resolve(name, "clip_vision", what)
    try:
        model = load_vision_encoder(path, config, kind, "the evaluation", what=f"{what} file",
                                    config_option=f"{what}-config")
    except BaseModelError as error:
        raise EvaluationError(str(error)) from None
    return model, path


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of a weight file, read from its header where the format allows (no weights loaded)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as error:  # safetensors raises its own types for a truncated or foreign file
            raise EvaluationError(f"{path.name} is not a readable .safetensors file: {error}") from error
    import comfy.utils

    return list(comfy.utils.load_torch_file(str(path)).keys())


def load_clip_text(name: str):
    import comfy.sd

    path = _resolve(name, "text_encoders", "CLIP text")
    keys = _tensor_names(path)
    if not any(k.endswith("text_projection.weight") or k.endswith("text_projection") for k in keys):
        raise EvaluationError(
            f"{path.name} has no text_projection tensor ({len(keys)} tensors): CLIP-T needs the projected text "
            "embedding, so give the full CLIP-L text encoder (e.g. clip_l.safetensors), not one taken out of an "
            "SD1.5 checkpoint (checkpoints do not carry the projection)")
    clip = comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    return clip, path


def load_models(args):
    """(Encoders, {name: header entry}) for the models the arguments name."""
    from image_ops.lpips import LPIPS_VERSION, load_lpips
    from image_ops.vision_features import CLIP, DINOV2

    encoders, header = sim.Encoders(), {}
    if args.clip_vision:
        encoders.clip_vision, path = load_vision(args.clip_vision, args.clip_vision_config, CLIP, "--clip-vision")
        header["clip_vision"] = {"file": path.name, "sha256": sha256(path),
                                 "model": sim.model_summary(encoders.clip_vision)}
    if args.dinov2:
        encoders.dinov2, path = load_vision(args.dinov2, args.dinov2_config, DINOV2, "--dinov2")
        header["dinov2"] = {"file": path.name, "sha256": sha256(path), "model": sim.model_summary(encoders.dinov2)}
    if args.clip_text:
        encoders.clip_text, path = load_clip_text(args.clip_text)
        header["clip_text"] = {"file": path.name, "sha256": sha256(path)}
    if args.lpips:
        import comfy.model_management as mm
        import folder_paths

        found = Path(args.lpips) if Path(args.lpips).is_file() else (
            folder_paths.get_full_path("lpips", args.lpips) if "lpips" in folder_paths.folder_names_and_paths
            else None)
        encoders.lpips = load_lpips(found or args.lpips, mm.get_torch_device())  # names the file when missing
        header["lpips"] = {"file": Path(found).name, "sha256": sha256(found), "backbone": encoders.lpips.backbone,
                           "lpips_version": LPIPS_VERSION}
    if not header:
        raise EvaluationError("no model given: use --clip-vision (CLIP-I, CLIP-T with --clip-text), --dinov2 "
                              "(DINO-I) and/or --lpips")
    encoders.check()
    return encoders, header


# ---- scoring and writing ----------------------------------------------------------------------------------------

def score_row(row: dict, encoders: sim.Encoders, settings: sim.Settings) -> dict:
    generated = load_image(row["generated"])
    references = [load_image(p) for p in row["references"]]
    sizes = {tuple(r.shape[-2:]) for r in references}
    if len(sizes) > 1:  # one batch needs one size: score each reference on its own, then average
        masks = row.get("reference_masks") or []
        parts = [score_row({**row, "references": [ref], "reference_masks":
                            [masks[i if len(masks) > 1 else 0]] if masks else None}, encoders, settings)
                 for i, ref in enumerate(row["references"])]
        return {m: sum(part[m] for part in parts) / len(parts) for m in parts[0]}
    gmask = load_mask(row["generated_mask"]) if row.get("generated_mask") else None
    if gmask is None and row.get("generated_points"):
        gmask = points_mask(encoders.clip_vision, generated, row["generated_points"])
    rmasks = None
    if row.get("reference_masks"):
        rmasks = torch.cat([load_mask(p) for p in row["reference_masks"] if p])
    elif row.get("reference_points"):
        rmasks = torch.cat([points_mask(encoders.clip_vision, r, row["reference_points"]) for r in references])
    prompts = [row["prompt"]] if encoders.clip_text is not None and row.get("prompt") else None
    if encoders.clip_text is not None and prompts is None:
        raise EvaluationError(f"{row.get('id', row['generated'])}: --clip-text is given but the row has no prompt")
    scores = sim.score(generated, torch.cat(references), encoders, settings, generated_masks=gmask,
                       reference_masks=rmasks, prompts=prompts)
    return {m: float(v[0]) for m, v in scores.items()}


def summarise(results: list[dict], metrics: list[str], group_by: str | None) -> list[dict]:
    groups = {"all": results}
    if group_by:
        for r in results:
            groups.setdefault(f"{group_by}={r.get(group_by)}", []).append(r)
    table = []
    for group, rows in groups.items():
        for metric in metrics:
            values = [r[metric] for r in rows if metric in r]
            count = len(values)
            mean = sum(values) / count if count else math.nan
            var = sum((v - mean) ** 2 for v in values) / (count - 1) if count > 1 else 0.0
            table.append({"group": group, "metric": metric, "mean": mean, "std": math.sqrt(var), "var": var,
                          "count": count})
    return table


def _csv_text(header: dict, rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    buffer.write("".join(f"# {line}\n" for line in json.dumps(header, indent=1, sort_keys=True).splitlines()))
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(out, header: dict, results: list[dict], summary: list[dict]) -> dict[str, Path]:
    """The four result files, each written to a temporary file and renamed into place."""
    out = Path(out)
    metrics = [m for m in sim.METRICS if any(m in r for r in results)]
    columns = ["id", "generated", "references", *metrics] + sorted(
        {k for r in results for k in r} - {"id", "generated", "references", *metrics})
    texts = {
        "results.jsonl": "".join(json.dumps(line, sort_keys=True) + "\n" for line in [{"header": header}, *results]),
        "results.csv": _csv_text(header, results, columns),
        "summary.json": json.dumps({"header": header, "summary": summary}, indent=1, sort_keys=True) + "\n",
        "summary.csv": _csv_text(header, summary, ["group", "metric", "mean", "std", "var", "count"]),
    }
    written = {}
    for name, text in texts.items():
        with atomic_write(out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written[name] = out / name
    return written


def evaluate(rows: list[dict], encoders: sim.Encoders, settings: sim.Settings, *, progress: bool = True):
    from tqdm import tqdm

    results = []
    for row in tqdm(rows, desc="evaluate", unit="image", disable=not progress, file=sys.stderr):
        scores = score_row(row, encoders, settings)
        extra = {k: v for k, v in row.items() if not k.startswith("_") and k not in (
            "generated", "references", "reference", "reference_mask", "reference_masks")}
        results.append({**extra, "id": row.get("id", Path(row["generated"]).stem), "generated": row["generated"],
                        "references": len(row["references"]), **scores})
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("inputs (a manifest, or folders)")
    src.add_argument("--manifest", help="JSONL manifest, one generated image per row")
    src.add_argument("--on-bad-row", choices=("stop", "skip"), default="stop")
    src.add_argument("--generated", help="folder of generated images")
    src.add_argument("--references", help="folder of the subject's reference images")
    src.add_argument("--generated-masks", help="folder of masks for the generated images (same file stems)")
    src.add_argument("--reference-masks", help="folder of masks for the reference images (same file stems)")
    src.add_argument("--prompt", help="the prompt of every generated image (CLIP-T)")
    src.add_argument("--prompts", help="text file: one prompt per generated image, in file-name order")
    mod = p.add_argument_group("models (file paths or names in ComfyUI's models folders)")
    mod.add_argument("--clip-vision", help="CLIP ViT vision file (models/clip_vision): CLIP-I, CLIP-T")
    mod.add_argument("--clip-vision-config", default="", help="ComfyUI JSON config for a non-standard size")
    mod.add_argument("--dinov2", help="DINOv2 file (models/clip_vision): DINO-I")
    mod.add_argument("--dinov2-config", default="", help="ComfyUI JSON config for a non-standard size")
    mod.add_argument("--clip-text", help="CLIP-L text encoder with text_projection (models/text_encoders, e.g. "
                                         "clip_l.safetensors): CLIP-T")
    mod.add_argument("--lpips", help="LPIPS weights file (models/lpips): LPIPS")
    opt = p.add_argument_group("protocol")
    opt.add_argument("--region", choices=sim.REGIONS, default="full",
                     help="full (DreamBench), box (AnyLogo region), segment (CustomContrast E-DI)")
    opt.add_argument("--dino-size", type=int, default=224)
    opt.add_argument("--lpips-size", type=int, default=256)
    opt.add_argument("--group-by", help="manifest field to summarise by as well (e.g. subject, prompt_set)")
    p.add_argument("--out", required=True, help="folder for results.jsonl/.csv and summary.json/.csv")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if bool(args.manifest) == bool(args.generated):
            raise EvaluationError("give either --manifest or --generated with --references")
        if args.manifest:
            rows = manifest_rows(args.manifest, args.on_bad_row)
        else:
            if not args.references:
                raise EvaluationError("--generated needs --references (the subject's images)")
            rows = folder_rows(args.generated, args.references, generated_masks=args.generated_masks,
                               reference_masks=args.reference_masks, prompt=args.prompt, prompts_file=args.prompts)
        settings = sim.Settings(region=args.region, dino_size=args.dino_size, lpips_size=args.lpips_size)
        encoders, models = load_models(args)
        results = evaluate(rows, encoders, settings, progress=not args.no_progress)
    except (EvaluationError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    import comfyui_version

    header = {"tool": "train.evaluate", **settings.describe(), "models": models, "rows": len(results),
              "inputs": args.manifest or {"generated": args.generated, "references": args.references},
              "torch": torch.__version__, "comfyui": comfyui_version.__version__,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    metrics = [m for m in sim.METRICS if any(m in r for r in results)]
    summary = summarise(results, metrics, args.group_by)
    write_results(args.out, header, results, summary)
    for line in summary:
        print(f"{line['group']:>12} {line['metric']:>7}: {line['mean']:.4f} ± {line['std']:.4f} (n={line['count']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
