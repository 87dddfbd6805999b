"""The bad-input matrix: every node of the pack × the bad inputs a ComfyUI user can produce → the message they see.

Each row names a node, the issue-12 class it belongs to (1 NaN/inf, 2 empty batch, 3 AnyLogo applied twice,
4 batch pairing, 5 malformed weight files, 6 degenerate inputs; 0 = shape/dtype/kind checks that predate the
issue, kept as regressions), the bad input and a fragment of the expected message. A row either calls the node
the way ComfyUI does (its FUNCTION with keyword arguments), calls a mechanism directly as another pack would, or
(``executor=True``) runs a prompt through ComfyUI's own validator and PromptExecutor, so the fragment is checked
in the text the UI's error dialog shows.

How a new node joins: add its default arguments to ``DEFAULTS`` (a valid call), generate the generic rows for its
IMAGE / MASK / FLOAT inputs with ``image_rows`` / ``mask_rows`` / ``float_rows``, and add rows for its own inputs.
``test_every_pack_node_is_in_the_matrix`` fails until every node and every IMAGE, MASK and FLOAT input has them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from standalone import tiny_models

NAN, INF = float("nan"), float("inf")


# ---- inputs ---------------------------------------------------------------------------------------------------

def img(batch=1, height=32, width=32, channels=3, fill=0.5):
    return torch.full((batch, height, width, channels), fill)


def poisoned(tensor, index, value=NAN):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def box_mask(batch=1, height=32, width=32):
    mask = torch.zeros(batch, height, width)
    mask[:, 8:24, 8:24] = 1
    return mask


def weight_file(ctx, name, *, tensors=None, **metadata):
    """A file in the test's models/anylogo folder: the good tiny weights with ``tensors`` / ``metadata`` changed."""
    import safetensors
    import safetensors.torch

    from model_patches.weight_files import save_weights

    with safetensors.safe_open(str(ctx.good_file), framework="pt") as f:
        meta = dict(f.metadata())
    content = safetensors.torch.load_file(str(ctx.good_file))
    content.update(tensors or {})
    save_weights(ctx.weights_dir / name, content, {**meta, **metadata})
    return name


# ---- the nodes' valid calls -------------------------------------------------------------------------------------

DEFAULTS: dict[str, Callable] = {
    "SC_FrequencySplit": lambda c: dict(images=img(), mode="signed", window="circle", cutoff_unit="fraction",
                                        low_cutoff=0.2, high_cutoff=0.02, channels="colour"),
    "SC_PointsToMask": lambda c: dict(image=img(), clip_vision=c.clip, positive_points="3,3", layer=-1,
                                      encoder_size=224, blur_sigma=1.0, dilation_px=0, coordinates="pixels",
                                      negative_points=""),
    "SC_DINOv2HierarchicalEncode": lambda c: dict(clip_vision=c.dino, subject=img(), resolution="224",
                                                  layers="quarters", fit="pad", margin=0.1, fill_color=0xFFFFFF,
                                                  use_mask=True, final_norm=False),
    "SC_CLIPHierarchicalEncode": lambda c: dict(clip_vision=c.clip, image=img(), layers="default",
                                                fit="center_crop", margin=0.0, fill_color=0xFFFFFF, use_mask=True,
                                                final_norm=False),
    "SC_AnyLogoApply": lambda c: dict(model=c.kit.model, vae=c.kit.vae, subject=img(), positions="decoder",
                                      threshold=1.0, strength=1.0, start_percent=0.0, end_percent=1.0, seed=0,
                                      subject_size=64),
    "SC_AnyLogoLoader": lambda c: dict(weights_name=c.good_file.name),
    "SC_SubjectSimilarity": lambda c: dict(generated=img(), reference=img(fill=0.3), region="full", dino_size=224,
                                           lpips_weights="none", lpips_size=256, rank_by="auto", clip_vision=c.clip),
    "SC_AnyLogoAttentionReport": lambda c: dict(model=c.recorded, samples={"samples": torch.zeros(1, 4, 8, 8)},
                                                width=32, height=32),
}


@dataclass(frozen=True)
class Row:
    node: str
    cls: int
    name: str
    fragment: str
    args: Callable | None = None      # ctx -> overrides of DEFAULTS[node] (a node call)
    run: Callable | None = None       # ctx -> None: a mechanism called directly, as another pack would
    executor: bool = False            # run the node call as a prompt through ComfyUI's executor
    covers: tuple = field(default=())  # (input name, check) pairs this row stands for, for the guard test

    @property
    def id(self):
        return f"{self.node}-c{self.cls}-{self.name}" + ("-executor" if self.executor else "")


def image_rows(node, name, *, executor=()):
    """The generic IMAGE rows: NaN, inf, empty batch, RGBA, a zero-sized side, integer pixels, no batch axis."""
    bad = {
        (1, "nan"): (lambda c: poisoned(img(), (0, 3, 5, 1)), "holds 1 non-finite value (1 NaN) of 3072, the first "
                     "at image 0, y 3, x 5, channel 1"),
        (1, "inf"): (lambda c: poisoned(img(), (0, 0, 0), INF), "3 non-finite values (3 inf) of 3072"),
        (2, "empty"): (lambda c: img(batch=0), f"{name} is an empty batch"),
        (6, "rgba"): (lambda c: img(channels=4), f"{name} has 4 channels (RGBA); expected 3 (RGB)"),
        (6, "zero_width"): (lambda c: img(width=0), f"{name} is 0x32 pixels (width x height); expected at least"),
        (0, "uint8"): (lambda c: img().to(torch.uint8), "must hold float pixels in 0..1, got dtype torch.uint8"),
        (0, "no_batch_axis"): (lambda c: img()[0], "without its batch dimension"),
        (0, "one_channel"): (lambda c: img(channels=1), "has 1 channel; expected 3 (RGB)"),
    }
    return [Row(node, cls, f"{name}_{check}", fragment, args=lambda c, make=make: {name: make(c)},
                executor=check in executor, covers=((name, check),))
            for (cls, check), (make, fragment) in bad.items()]


def mask_rows(node, name, *, images, of, executor=()):
    """The generic MASK rows; ``images`` is the name of the IMAGE input the mask pairs with."""
    bad = {
        (1, "nan"): (lambda c: {name: poisoned(box_mask(), (0, 2, 7))}, "holds 1 non-finite value (1 NaN) of 1024, "
                     "the first at mask 0, y 2, x 7"),
        (2, "empty"): (lambda c: {name: box_mask(batch=0)}, f"{name} is an empty batch"),
        (4, "pairing"): (lambda c: {images: img(batch=2), name: box_mask(batch=3)},
                         f"3 masks in {name} for 2 {of}s; expected one mask for all, or one per {of}"),
        (0, "image_as_mask"): (lambda c: {name: img()}, "an IMAGE connected as a mask? Use Convert Image to Mask"),
    }
    return [Row(node, cls, f"{name}_{check}", fragment, args=make, executor=check in executor,
                covers=((name, check),))
            for (cls, check), (make, fragment) in bad.items()]


def float_rows(node, *names, executor=()):
    """A NaN in each FLOAT widget (ComfyUI's validator lets NaN through: it compares false with min and max)."""
    return [Row(node, 6, f"{name}_nan", f"{name} is nan; expected a finite number",
                args=lambda c, name=name: {name: NAN}, executor=name in executor, covers=((name, "nan"),))
            for name in names]


def apply_twice(c, first, second):
    from model_patches.anylogo import RecyclingSettings, build_patch

    model = c.kit.apply(positions=first)
    patch = model.get_attachment("subject_customization.anylogo")
    settings = RecyclingSettings(positions=second)
    build_patch(model.clone(), patch.subject, settings).install(model.clone())  # another pack, no node


def build_with_latent(c, latent):
    from model_patches.anylogo import RecyclingSettings, build_patch

    build_patch(c.kit.model.clone(), latent, RecyclingSettings())


def recycling_settings(**kwargs):
    from model_patches.anylogo import RecyclingSettings

    RecyclingSettings(**kwargs)


def points_mechanism(**kwargs):
    from image_ops.point_mask import points_to_mask

    args = dict(tokens=torch.randn(16, 8), grid=(4, 4), height=32, width=32, positives=((3.0, 3.0),))
    args.update(kwargs)
    points_to_mask(**args)


def nan_embeds():
    from image_ops.hierarchical_embeds import HierarchicalEmbeds

    groups = tuple(poisoned(torch.randn(1, 5, 1024), (0, 1, 2)) if i == 1 else torch.randn(1, 5, 1024)
                   for i in range(4))
    return HierarchicalEmbeds("dinov2", (6, 12, 18, 24), groups, (224, 224), {}, torch.randn(1, 4, 1024))


FREQ, POINTS, DINO, CLIPN = "SC_FrequencySplit", "SC_PointsToMask", "SC_DINOv2HierarchicalEncode", \
    "SC_CLIPHierarchicalEncode"
APPLY, LOADER, REPORT = "SC_AnyLogoApply", "SC_AnyLogoLoader", "SC_AnyLogoAttentionReport"
SIMILARITY = "SC_SubjectSimilarity"

ROWS: list[Row] = [
    # -- Frequency Split --------------------------------------------------------------------------------------
    *image_rows(FREQ, "images", executor=("nan",)),
    *float_rows(FREQ, "low_cutoff", "high_cutoff"),
    Row(FREQ, 0, "cutoff_fraction_above_1", "a cutoff fraction must be at most 1", args=lambda c: {"low_cutoff": 2.0}),
    Row(FREQ, 0, "cutoff_beyond_spectrum", "larger than the spectrum",
        args=lambda c: {"cutoff_unit": "pixels", "low_cutoff": 100.0}),
    Row(FREQ, 0, "unknown_mode", "mode must be one of", args=lambda c: {"mode": "fast"}),

    # -- Points to Mask -----------------------------------------------------------------------------------------
    *image_rows(POINTS, "image", executor=("empty",)),
    *float_rows(POINTS, "blur_sigma"),
    Row(POINTS, 6, "encoder_size_one_patch", "encoder size 14 gives a 1x1 patch grid",
        args=lambda c: {"encoder_size": 14}, executor=True),
    Row(POINTS, 6, "mechanism_blur_sigma_nan", "blur sigma must be a finite number >= 0",
        run=lambda c: points_mechanism(blur_sigma=NAN)),
    Row(POINTS, 6, "mechanism_one_cell_grid", "a 1x1 patch grid has nothing to compare",
        run=lambda c: points_mechanism(tokens=torch.randn(1, 8), grid=(1, 1))),
    Row(POINTS, 1, "mechanism_nan_tokens", "the patch tokens hold 1 non-finite values",
        run=lambda c: points_mechanism(tokens=poisoned(torch.randn(16, 8), (5, 2)))),
    Row(POINTS, 0, "point_outside", "is outside image 1", args=lambda c: {"positive_points": "40,3"}),
    Row(POINTS, 0, "no_positive_point", "no positive point", args=lambda c: {"positive_points": ""}),
    Row(POINTS, 0, "unreadable_point", "cannot read the positive point", args=lambda c: {"positive_points": "a,b"}),
    Row(POINTS, 0, "per_image_lists_vs_batch", "give one list per image",
        args=lambda c: {"image": img(batch=3), "positive_points": "1,1 | 2,2"}),
    Row(POINTS, 0, "dinov2_model", "needs CLIP ViT vision", args=lambda c: {"clip_vision": c.dino}),
    Row(POINTS, 0, "encoder_size_not_multiple", "not a multiple of this model's 14-pixel patch",
        args=lambda c: {"encoder_size": 230}),
    Row(POINTS, 6, "image_smaller_than_a_patch", "smaller than one 14x14 patch",
        args=lambda c: {"image": img(height=10, width=10)}),

    # -- DINOv2 Hierarchical Encode -----------------------------------------------------------------------------
    *image_rows(DINO, "subject", executor=("rgba",)),
    *image_rows(DINO, "background"),
    *mask_rows(DINO, "subject_mask", images="subject", of="subject image"),
    *float_rows(DINO, "margin"),
    Row(DINO, 4, "background_pairing", "3 background images in background for 2 subject images",
        args=lambda c: {"subject": img(batch=2), "background": img(batch=3)}),
    Row(DINO, 0, "empty_subject_mask", "subject mask 0 is empty",
        args=lambda c: {"subject_mask": torch.zeros(1, 32, 32)}),
    Row(DINO, 0, "clip_model", "needs DINOv2", args=lambda c: {"clip_vision": c.clip}),
    Row(DINO, 0, "unknown_layer", "do not exist", args=lambda c: {"layers": "6,99"}),

    # -- CLIP Hierarchical Encode -------------------------------------------------------------------------------
    *image_rows(CLIPN, "image"),
    *mask_rows(CLIPN, "mask", images="image", of="image", executor=("pairing",)),
    *float_rows(CLIPN, "margin"),
    Row(CLIPN, 0, "dinov2_model", "needs CLIP ViT vision", args=lambda c: {"clip_vision": c.dino}),
    Row(CLIPN, 0, "unreadable_layers", "layers must be 'quarters'", args=lambda c: {"layers": "six"}),

    # -- AnyLogo Apply ------------------------------------------------------------------------------------------
    *image_rows(APPLY, "subject"),
    *mask_rows(APPLY, "subject_mask", images="subject", of="subject image"),
    *float_rows(APPLY, "threshold", "strength", "start_percent", "end_percent", executor=("strength",)),
    Row(APPLY, 4, "two_masks_for_one_subject", "2 masks in subject_mask for 1 subject image;",
        args=lambda c: {"subject_mask": box_mask(batch=2)}),
    Row(APPLY, 3, "twice_disjoint_layers", "this MODEL already has AnyLogo applied (positions decoder",
        args=lambda c: {"model": c.kit.apply(positions="decoder"), "positions": "encoder"}, executor=True),
    Row(APPLY, 3, "twice_same_layers", "already has AnyLogo applied",
        args=lambda c: {"model": c.kit.apply(positions="decoder")}),
    Row(APPLY, 3, "mechanism_twice_disjoint", "already has AnyLogo applied (positions decoder",
        run=lambda c: apply_twice(c, "decoder", "encoder")),
    Row(APPLY, 6, "mechanism_strength_nan", "the recycling strength is nan; expected a finite number",
        run=lambda c: recycling_settings(strength=NAN)),
    Row(APPLY, 6, "mechanism_threshold_nan", "the recycling threshold is nan",
        run=lambda c: recycling_settings(threshold=NAN)),
    Row(APPLY, 6, "mechanism_sigma_nan", "sigma_end is NaN", run=lambda c: recycling_settings(sigma_end=NAN)),
    Row(APPLY, 1, "mechanism_nan_subject_latent", "the subject latent holds 1 non-finite value",
        run=lambda c: build_with_latent(c, poisoned(torch.zeros(1, 4, 8, 8), (0, 1, 2, 3)))),
    Row(APPLY, 1, "nan_embeds", "subject_embeds (layer 12) holds 1 non-finite value",
        args=lambda c: {"anylogo": c.good_weights, "subject_embeds": nan_embeds()}),
    Row(APPLY, 0, "start_after_end", "must not be after", args=lambda c: {"start_percent": 0.8, "end_percent": 0.2}),
    Row(APPLY, 0, "embeds_without_weights", "used with AnyLogo weights only",
        args=lambda c: {"subject_embeds": nan_embeds()}),
    Row(APPLY, 0, "weights_without_embeds", "connect a DINOv2 Hierarchical Encode",
        args=lambda c: {"anylogo": c.good_weights}),
    Row(APPLY, 0, "weights_for_plain_sd15", "for sd15-inpainting models, but this MODEL is sd15",
        args=lambda c: {"model": c.plain_model, "anylogo": c.good_weights}),
    Row(APPLY, 0, "empty_subject_mask", "subject mask 0 is empty",
        args=lambda c: {"subject_mask": torch.zeros(1, 32, 32)}),

    # -- AnyLogo Loader -----------------------------------------------------------------------------------------
    Row(LOADER, 5, "projection_weight_1d", "tensor 'image_projection.weight' has shape [768]; expected [768, any]",
        args=lambda c: {"weights_name": weight_file(c, "w1d.safetensors",
                                                    tensors={"image_projection.weight": torch.zeros(768)})}),
    Row(LOADER, 5, "projection_bias_shape", "w_bias.safetensors: tensor 'image_projection.bias' has shape [10]",
        args=lambda c: {"weights_name": weight_file(c, "w_bias.safetensors",
                                                    tensors={"image_projection.bias": torch.zeros(10)})}),
    Row(LOADER, 5, "projection_width_not_768", "has shape [320, 1024]; expected [768, any]",
        args=lambda c: {"weights_name": weight_file(c, "w320.safetensors",
                                                    tensors={"image_projection.weight": torch.zeros(320, 1024)})}),
    Row(LOADER, 5, "nan_projection", "w_nan.safetensors: tensor 'image_projection.weight' (768, 1024) holds 1 "
        "non-finite value (1 NaN)",
        args=lambda c: {"weights_name": weight_file(c, "w_nan.safetensors", tensors={
            "image_projection.weight": poisoned(torch.zeros(768, 1024), (3, 4))})}, executor=True),
    Row(LOADER, 5, "inf_unet_tensor", "w_inf.safetensors: tensor 'unet.", args=lambda c: {
        "weights_name": weight_file(c, "w_inf.safetensors", tensors={f"unet.{c.unet_key}": torch.full(
            c.good_weights.unet[c.unet_key].shape, INF, dtype=torch.float16)})}),
    Row(LOADER, 5, "integer_tensor", "has dtype torch.int64; expected floating-point",
        args=lambda c: {"weights_name": weight_file(c, "w_int.safetensors",
                                                    tensors={"image_projection.bias": torch.zeros(768).long()})}),
    Row(LOADER, 5, "image_layers_a_number", "metadata image_layers is '6'; expected a JSON list",
        args=lambda c: {"weights_name": weight_file(c, "w_l6.safetensors", image_layers="6")}, executor=True),
    Row(LOADER, 5, "image_layers_text", "metadata image_layers is 'abc'; expected a JSON list",
        args=lambda c: {"weights_name": weight_file(c, "w_labc.safetensors", image_layers="abc")}),
    Row(LOADER, 5, "image_resolution_text", "metadata image_resolution is 'abc'",
        args=lambda c: {"weights_name": weight_file(c, "w_rabc.safetensors", image_resolution="abc")}),
    Row(LOADER, 0, "another_method", "expected 'anylogo' weights",
        args=lambda c: {"weights_name": weight_file(c, "w_eq.safetensors", method="eqdiff")}),
    Row(LOADER, 0, "newer_format", "format version 9",
        args=lambda c: {"weights_name": weight_file(c, "w_v9.safetensors", format_version="9")}),
    Row(LOADER, 0, "another_architecture", "this pack's AnyLogo supports",
        args=lambda c: {"weights_name": weight_file(c, "w_sdxl.safetensors", base_architecture="sdxl")}),
    Row(LOADER, 0, "not_in_folder", "absent.safetensors", args=lambda c: {"weights_name": "absent.safetensors"},
        executor=True),

    # -- Subject Similarity ---------------------------------------------------------------------------------------
    *image_rows(SIMILARITY, "generated", executor=("nan",)),
    *image_rows(SIMILARITY, "reference"),
    *mask_rows(SIMILARITY, "generated_mask", images="generated", of="generated image", executor=("pairing",)),
    *mask_rows(SIMILARITY, "reference_mask", images="reference", of="reference image"),
    Row(SIMILARITY, 0, "missing_reference", "reference must be a", args=lambda c: {"reference": None}),
    Row(SIMILARITY, 4, "prompt_count_mismatch", "text has 3 prompt lines for 2 generated images",
        args=lambda c: {"generated": img(batch=2), "text": "a\nb\nc"}),
    Row(SIMILARITY, 6, "empty_generated_mask", "generated mask 0 is empty",
        args=lambda c: {"region": "box", "generated_mask": torch.zeros(1, 32, 32)}),
    Row(SIMILARITY, 6, "box_without_mask", "region 'box' needs a generated mask", args=lambda c: {"region": "box"}),
    Row(SIMILARITY, 0, "dinov2_as_clip_vision", "needs CLIP ViT vision", args=lambda c: {"clip_vision": c.dino}),
    Row(SIMILARITY, 0, "clip_as_dinov2", "needs DINOv2", args=lambda c: {"dinov2": c.clip}),
    Row(SIMILARITY, 5, "missing_lpips_weights", "LPIPS weights file not found",
        args=lambda c: {"lpips_weights": "alex_lpips.safetensors"}),
    Row(SIMILARITY, 5, "missing_lpips_weights_in_ui", "alex_lpips.safetensors",
        args=lambda c: {"lpips_weights": "alex_lpips.safetensors"}, executor=True),
    Row(SIMILARITY, 0, "no_model", "nothing to compute", args=lambda c: {"clip_vision": None}),
    Row(SIMILARITY, 0, "rank_by_missing_metric", "rank_by is 'dino_i' but DINO-I is not computed",
        args=lambda c: {"rank_by": "dino_i"}),

    # -- AnyLogo Attention Report -------------------------------------------------------------------------------
    Row(REPORT, 1, "nan_samples", "samples holds 1 non-finite value (1 NaN) of 256, the first at latent 0, channel 1",
        args=lambda c: {"samples": {"samples": poisoned(torch.zeros(1, 4, 8, 8), (0, 1, 2, 3))}}, executor=True),
    Row(REPORT, 2, "empty_samples", "samples holds an empty latent batch",
        args=lambda c: {"samples": {"samples": torch.zeros(0, 4, 8, 8)}}),
    Row(REPORT, 0, "not_a_latent", "samples must be a LATENT", args=lambda c: {"samples": torch.zeros(1, 4, 8, 8)}),
    Row(REPORT, 0, "model_without_recording", "no AnyLogo attention recording",
        args=lambda c: {"model": c.kit.model}),
    Row(REPORT, 0, "heatmap_too_small", "Value 4 smaller than min of 8", args=lambda c: {"width": 4},
        executor=True),
]


# ---- EqDiff (issue 13) --------------------------------------------------------------------------------------------
# Its own block so other methods' rows merge beside it. The EqDiff files are made once, lazily, from the matrix's
# plain tiny SD1.5 model, in a models/eqdiff folder of their own.

_EQ: dict = {}


def eq(c):
    """{"dir", "good", "weights", "model"}: a good random EqDiff file for the tiny SD1.5 and its loaded form."""
    if not _EQ:
        import tempfile
        from pathlib import Path

        import folder_paths

        from model_patches.eqdiff import load_eqdiff_weights
        from standalone.tiny_eqdiff import build_eqdiff_weights

        folder = Path(tempfile.mkdtemp(prefix="eqdiff_matrix_"))
        folder_paths.add_model_folder_path("eqdiff", str(folder), is_default=True)
        for kind in ("embeddings", "loras"):  # where the Train Subject default call writes (not ComfyUI's own)
            (folder / kind).mkdir()
            folder_paths.add_model_folder_path(kind, str(folder / kind), is_default=True)
        good = build_eqdiff_weights(folder / "good.safetensors", c.plain_model)
        _EQ.update(dir=folder, good=good, weights=load_eqdiff_weights(good))
    return _EQ


def eq_file(c, name, *, tensors=None, drop=(), **metadata):
    import safetensors
    import safetensors.torch

    from model_patches.weight_files import save_weights

    good = eq(c)["good"]
    with safetensors.safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    content = {k: v for k, v in safetensors.torch.load_file(str(good)).items() if k not in drop}
    content.update(tensors or {})
    save_weights(eq(c)["dir"] / name, content, {**meta, **metadata})
    return name


def eq_applied(c, **overrides):
    node = c.nodes.NODE_CLASS_MAPPINGS[EQ_APPLY]()
    return node.apply(**{**DEFAULTS[EQ_APPLY](c), **overrides})[0]


def eq_other_base(c):
    """The good file with one layer renamed: what a file trained on another UNet layout looks like."""
    from model_patches.eqdiff import load_eqdiff_weights

    weights = load_eqdiff_weights(eq(c)["good"])
    weights.layers = [name.replace("output", "input") for name in weights.layers]
    return weights


EQ_APPLY, EQ_LOADER, EQ_REPORT = "SC_EqDiffApply", "SC_EqDiffLoader", "SC_EqDiffReferenceReport"
EQ_TRAIN = "SC_EqDiffTrainSubject"
_TRAIN_RUNS = iter(range(10 ** 6))


def eq_train_defaults(c):
    """A real one-step training at 64 px with one class image of one sampling step (about half a minute)."""
    eq(c)
    return dict(ckpt_name="tiny_sd15.safetensors", images=img(batch=2, height=64, width=64), class_word="cat",
                name=f"matrix_{next(_TRAIN_RUNS)}", steps=1, learning_rate=1e-4, resolution=64, num_class_images=1,
                seed=0, masks=box_mask(batch=2, height=64, width=64), class_image_steps=1)
_RRA_KEY = "rra.output3_0.fusion.weight"

DEFAULTS.update({
    EQ_APPLY: lambda c: dict(model=c.plain_model, vae=c.kit.vae, eqdiff=eq(c)["weights"], reference=img(),
                             strength=1.0, start_percent=0.0, end_percent=1.0, reference_mode="clean", seed=0,
                             reference_size=64),
    EQ_LOADER: lambda c: dict(weights_name=eq(c)["good"].name),
    EQ_TRAIN: eq_train_defaults,
    EQ_REPORT: lambda c: dict(model=eq_applied(c, record=True), samples={"samples": torch.zeros(1, 4, 8, 8)},
                              width=32, height=32),
})

EQDIFF_ROWS: list[Row] = [
    # -- EqDiff Apply -------------------------------------------------------------------------------------------
    *image_rows(EQ_APPLY, "reference"),
    *mask_rows(EQ_APPLY, "reference_mask", images="reference", of="reference image"),
    *float_rows(EQ_APPLY, "strength", "start_percent", "end_percent"),
    Row(EQ_APPLY, 0, "start_after_end", "must not be after", args=lambda c: {"start_percent": 0.8,
                                                                            "end_percent": 0.2}),
    Row(EQ_APPLY, 6, "empty_reference_mask", "reference_mask is empty inside the centre crop",
        args=lambda c: {"reference_mask": torch.zeros(1, 32, 32)}),
    Row(EQ_APPLY, 0, "inpainting_model", "4 input channels", args=lambda c: {"model": c.kit.model}),
    Row(EQ_APPLY, 0, "weights_for_another_base", "the weights are for another base model",
        args=lambda c: {"eqdiff": eq_other_base(c)}),
    Row(EQ_APPLY, 3, "applied_twice", "already has EqDiff applied", args=lambda c: {"model": eq_applied(c)}),
    Row(EQ_APPLY, 3, "after_anylogo", "apply EqDiff before AnyLogo",
        args=lambda c: {"model": c.kit.apply(model=c.plain_model)}),
    Row(EQ_APPLY, 0, "reference_size_not_multiple", "expected a multiple of 64",
        args=lambda c: {"reference_size": 100}),
    Row(EQ_APPLY, 6, "mechanism_strength_nan", "the EqDiff strength is nan",
        run=lambda c: __import__("model_patches.eqdiff", fromlist=["x"]).EqDiffSettings(strength=NAN)),
    Row(EQ_APPLY, 1, "mechanism_nan_reference_latent", "the reference latent holds 1 non-finite value",
        run=lambda c: __import__("model_patches.eqdiff", fromlist=["x"]).build_patch(
            c.plain_model.clone(), eq(c)["weights"], poisoned(torch.zeros(1, 4, 8, 8), (0, 1, 2, 3)),
            __import__("model_patches.eqdiff", fromlist=["x"]).EqDiffSettings())),

    # -- EqDiff Loader ------------------------------------------------------------------------------------------
    Row(EQ_LOADER, 0, "another_method", "expected 'eqdiff' weights",
        args=lambda c: {"weights_name": eq_file(c, "e_any.safetensors", method="anylogo")}),
    Row(EQ_LOADER, 0, "newer_format", "format version 9",
        args=lambda c: {"weights_name": eq_file(c, "e_v9.safetensors", format_version="9")}),
    Row(EQ_LOADER, 0, "another_architecture", "this pack's EqDiff supports",
        args=lambda c: {"weights_name": eq_file(c, "e_sdxl.safetensors", base_architecture="sdxl")}),
    Row(EQ_LOADER, 5, "nan_tensor", f"tensor '{_RRA_KEY}'", executor=True,
        args=lambda c: {"weights_name": eq_file(c, "e_nan.safetensors", tensors={
            _RRA_KEY: poisoned(eq(c)["weights"].tensors()[_RRA_KEY].clone(), (0, 0))})}),
    Row(EQ_LOADER, 5, "missing_tensor", "lacks tensor 'rra.output3_0.to_k_res.weight'",
        args=lambda c: {"weights_name": eq_file(c, "e_missing.safetensors", drop=("rra.output3_0.to_k_res.weight",))}),
    Row(EQ_LOADER, 5, "fusion_shape", "has shape [5]; expected [321, 640], the fusion head H_r",
        args=lambda c: {"weights_name": eq_file(c, "e_shape.safetensors", tensors={_RRA_KEY: torch.zeros(5)})}),
    Row(EQ_LOADER, 5, "layers_not_a_list", "metadata layers is '3'",
        args=lambda c: {"weights_name": eq_file(c, "e_layers.safetensors", layers="3")}),
    Row(EQ_LOADER, 0, "not_in_folder", "absent_eq.safetensors", executor=True,
        args=lambda c: {"weights_name": "absent_eq.safetensors"}),

    # -- EqDiff Train Subject (every row fails before training starts) ------------------------------------------
    *image_rows(EQ_TRAIN, "images"),
    *mask_rows(EQ_TRAIN, "masks", images="images", of="image"),
    *float_rows(EQ_TRAIN, "learning_rate"),
    Row(EQ_TRAIN, 4, "masks_of_another_size", "masks are 32x32 but the images 64x64",
        args=lambda c: {"masks": box_mask(batch=2)}),
    Row(EQ_TRAIN, 6, "empty_mask", "mask 1 is empty", args=lambda c: {"masks": torch.cat([
        box_mask(batch=1, height=64, width=64), torch.zeros(1, 64, 64)])}),
    Row(EQ_TRAIN, 0, "no_class_word", "class_word is ' '; expected one word", args=lambda c: {"class_word": " "}),
    Row(EQ_TRAIN, 0, "bad_name", "name 'a/b' must be letters", args=lambda c: {"name": "a/b"}),
    Row(EQ_TRAIN, 0, "placeholder_not_one_token", "tokens in CLIP's tokenizer",
        args=lambda c: {"placeholder": "qwertyzxcv"}),
    Row(EQ_TRAIN, 0, "empty_placeholder", "the placeholder '' is 0 tokens",
        args=lambda c: {"placeholder": ""}),

    # -- EqDiff Reference Report --------------------------------------------------------------------------------
    Row(EQ_REPORT, 1, "nan_samples", "samples holds 1 non-finite value (1 NaN)", executor=True,
        args=lambda c: {"samples": {"samples": poisoned(torch.zeros(1, 4, 8, 8), (0, 1, 2, 3))}}),
    Row(EQ_REPORT, 2, "empty_samples", "samples holds an empty latent batch",
        args=lambda c: {"samples": {"samples": torch.zeros(0, 4, 8, 8)}}),
    Row(EQ_REPORT, 0, "model_without_recording", "no EqDiff recording", args=lambda c: {"model": c.plain_model}),
]
ROWS += EQDIFF_ROWS


# ---- P3S (issue 14): its own block, so other methods' rows merge beside it ------------------------------------

P3S_APPLY, P3S_LOADER, P3S_TRAIN = "SC_P3SApply", "SC_P3SLoader", "SC_P3STrainSubject"
_P3S: dict = {}


def p3s_good(c):
    """(folder, good file, loaded weights) of a random-weight P3S file for the tiny SD1.5, built once."""
    if not _P3S:
        from pathlib import Path

        import folder_paths

        from model_patches.p3s_copy import InjectionCopy, layout_signature
        from model_patches.p3s_rngr import RNGREncoder
        from model_patches.p3s_weights import export_tensors, load_p3s_weights, save_p3s_weights
        from model_patches.unet_layout import ARCHITECTURES

        folder = Path(c.weights_dir).parent / "p3s_weights"  # beside the test's anylogo folder (pytest's tmp)
        folder.mkdir(exist_ok=True)
        folder_paths.add_model_folder_path("p3s", str(folder), is_default=True)
        copy = InjectionCopy(c.plain_model)
        tensors = export_tensors(copy, RNGREncoder(clip_width=64), torch.randn(1, 4, 8, 8), torch.randn(1, 257, 64),
                                 dtype=torch.float16)
        save_p3s_weights(folder / "good.safetensors", tensors, {
            "base_architecture": ARCHITECTURES[4], "copy_layout": layout_signature(c.plain_model), "lambda": 0.2,
            "resolution": 64, "clip_size": 224})
        _P3S.update(folder=folder, file=folder / "good.safetensors",
                    weights=load_p3s_weights(folder / "good.safetensors"))
    return _P3S


def p3s_file(c, name, *, tensors=None, drop=(), **metadata):
    """A file beside the good P3S file with ``tensors`` replaced, ``drop`` removed and ``metadata`` changed."""
    import safetensors
    import safetensors.torch

    from model_patches.weight_files import save_weights

    good = p3s_good(c)
    with safetensors.safe_open(str(good["file"]), framework="pt") as f:
        meta = dict(f.metadata())
    content = {k: v for k, v in safetensors.torch.load_file(str(good["file"])).items() if k not in drop}
    content.update(tensors or {})
    save_weights(good["folder"] / name, content, {**meta, **metadata})
    return name


def p3s_loaded(c, name, **changes):
    from model_patches.p3s_weights import load_p3s_weights

    return load_p3s_weights(p3s_good(c)["folder"] / p3s_file(c, name, **changes))


def p3s_train_defaults(c):
    p3s_good(c)  # registers the test's folder first in models/p3s: the trained file goes there
    return dict(ckpt_name="tiny_sd15.safetensors", clip_vision_name="random_clip_vit_l.safetensors", image=img(),
                positive_points="8,8", negative_points="24,24", class_word="toy", identifier="sks",
                name="matrix_subject", epochs=1, learning_rate=1e-3, resolution=64, seed=0)


def p3s_twice(c):
    node = c.nodes.NODE_CLASS_MAPPINGS[P3S_APPLY]()
    once = node.apply(**DEFAULTS[P3S_APPLY](c))[0]
    node.apply(**{**DEFAULTS[P3S_APPLY](c), "model": once})


def p3s_settings(**kwargs):
    from model_patches.p3s import P3SSettings

    P3SSettings(**kwargs)


DEFAULTS.update({
    P3S_APPLY: lambda c: dict(model=c.plain_model, p3s=p3s_good(c)["weights"], strength=1.0, weight_curve="paper",
                              alpha=0.5, beta=0.2, k=2.0, start_percent=0.0, end_percent=1.0, reference=img(),
                              vae=c.kit.vae, clip_vision=c.clip),
    P3S_LOADER: lambda c: dict(weights_name=p3s_good(c)["file"].name),
    P3S_TRAIN: lambda c: p3s_train_defaults(c),
})

ROWS += [
    # -- P3S Apply ----------------------------------------------------------------------------------------------
    *image_rows(P3S_APPLY, "reference"),
    *image_rows(P3S_APPLY, "inpainted_reference"),
    *mask_rows(P3S_APPLY, "negatives_mask", images="reference", of="reference image"),
    *float_rows(P3S_APPLY, "strength", "alpha", "beta", "k", "start_percent", "end_percent"),
    Row(P3S_APPLY, 6, "negatives_mask_wrong_size", "negatives_mask is 16x16 pixels but the reference is 32x32",
        args=lambda c: {"negatives_mask": torch.ones(1, 16, 16)}),
    Row(P3S_APPLY, 6, "empty_negatives_mask", "negatives_mask is empty (nothing above 0.5)",
        args=lambda c: {"negatives_mask": torch.zeros(1, 32, 32)}),
    Row(P3S_APPLY, 6, "inpainted_wrong_size", "inpainted_reference is 16x16 pixels but the reference is 32x32",
        args=lambda c: {"inpainted_reference": img(height=16, width=16)}),
    Row(P3S_APPLY, 0, "mask_without_reference", "negatives_mask is connected but reference is not",
        args=lambda c: {"reference": None, "negatives_mask": box_mask()}),
    Row(P3S_APPLY, 0, "reference_without_vae", "connect both", args=lambda c: {"vae": None}),
    Row(P3S_APPLY, 0, "dinov2_as_clip_vision", "needs CLIP ViT vision", args=lambda c: {"clip_vision": c.dino}),
    Row(P3S_APPLY, 0, "start_after_end", "must not be after", args=lambda c: {"start_percent": 0.8,
                                                                               "end_percent": 0.2}),
    Row(P3S_APPLY, 0, "unknown_curve", "weight_curve must be one of", args=lambda c: {"weight_curve": "cubic"}),
    Row(P3S_APPLY, 0, "weights_for_another_architecture", "is for sd15 models, but this MODEL is sd15-inpainting",
        args=lambda c: {"model": c.kit.model}),
    Row(P3S_APPLY, 5, "copy_for_another_unet_layout", "holds a copy for a UNet with 3 transformer layers",
        args=lambda c: {"p3s": p3s_loaded(c, "p3s_layout.safetensors", copy_layout="[[\"input\", 1, 0, 0, 320, 8], "
                        "[\"middle\", 0, 0, 1, 640, 8], [\"output\", 3, 0, 0, 320, 8]]")}),
    Row(P3S_APPLY, 5, "copy_tensor_of_another_shape", "does not fit this UNet's P3S copy: 0 tensors missing",
        args=lambda c: {"p3s": p3s_loaded(c, "p3s_shape.safetensors",
                                          tensors={"copy.self_proj.0.weight": torch.zeros(320, 64)})}),
    Row(P3S_APPLY, 3, "applied_twice", "already has P3S applied", run=p3s_twice),
    Row(P3S_APPLY, 6, "mechanism_strength_nan", "the P3S strength is nan", run=lambda c: p3s_settings(strength=NAN)),
    Row(P3S_APPLY, 6, "mechanism_alpha_inf", "the P3S weight curve's alpha is inf",
        run=lambda c: p3s_settings(alpha=INF)),

    # -- P3S Loader ---------------------------------------------------------------------------------------------
    Row(P3S_LOADER, 0, "another_method", "expected 'p3s' weights",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_any.safetensors", method="anylogo")}),
    Row(P3S_LOADER, 0, "newer_format", "format version 9",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_v9.safetensors", format_version="9")}),
    Row(P3S_LOADER, 0, "another_architecture", "this pack's P3S supports",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_sdxl.safetensors", base_architecture="sdxl")}),
    Row(P3S_LOADER, 5, "nan_copy_tensor", "tensor 'copy.self_proj.0.weight' (320, 320) holds 1 non-finite value",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_nan.safetensors", tensors={
            "copy.self_proj.0.weight": poisoned(torch.zeros(320, 320), (1, 2))})}),
    Row(P3S_LOADER, 5, "missing_rngr", "lacks 1 required tensors, e.g. ['rngr.to_v.weight']",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_norngr.safetensors", drop=("rngr.to_v.weight",))}),
    Row(P3S_LOADER, 5, "no_copy", "holds no injection copy",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_nocopy.safetensors", drop=tuple(
            "copy." + k for k in p3s_good(c)["weights"].copy_state))}),
    Row(P3S_LOADER, 5, "reference_shape", "reference tensors have shapes [4, 8, 8]",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_ref.safetensors",
                                                 tensors={"reference.latent": torch.zeros(4, 8, 8)})}),
    Row(P3S_LOADER, 5, "clip_states_width", "the stored CLIP states are 32-wide but the RNGR encoder reads 64",
        args=lambda c: {"weights_name": p3s_file(c, "p3s_cs.safetensors",
                                                 tensors={"reference.clip_states": torch.zeros(1, 257, 32)})}),
    Row(P3S_LOADER, 0, "not_in_folder", "absent_p3s.safetensors",
        args=lambda c: {"weights_name": "absent_p3s.safetensors"}, executor=True),

    # -- P3S Train Subject ----------------------------------------------------------------------------------------
    *image_rows(P3S_TRAIN, "image"),
    *image_rows(P3S_TRAIN, "inpainted"),
    *mask_rows(P3S_TRAIN, "negatives_mask", images="image", of="image"),
    *float_rows(P3S_TRAIN, "learning_rate"),
    Row(P3S_TRAIN, 6, "negatives_mask_wrong_size", "negatives_mask is 16x16 pixels but the image is 32x32",
        args=lambda c: {"negatives_mask": torch.ones(1, 16, 16)}),
    Row(P3S_TRAIN, 0, "point_outside", "is outside image 1", args=lambda c: {"positive_points": "40,3"}),
    Row(P3S_TRAIN, 0, "no_positive_point", "no positive point", args=lambda c: {"positive_points": ""}),
    Row(P3S_TRAIN, 0, "empty_class_word", "class_word is empty", args=lambda c: {"class_word": " "}),
    Row(P3S_TRAIN, 0, "name_with_folder", "must be a plain file name", args=lambda c: {"name": "../x"}),
    Row(P3S_TRAIN, 0, "dinov2_file", "needs CLIP ViT vision",
        args=lambda c: {"clip_vision_name": "random_dinov2_large.safetensors"}),
]


# ---- CustomContrast (issue 15): its own block, so rows of other methods can be added above without conflicts ----

CC_LOADER, CC_APPLY = "SC_CustomContrastLoader", "SC_CustomContrastApply"
_CC: dict = {}


def cc(c) -> dict:
    """The tiny SD1.5 with a 2-block text encoder, a CustomContrast weights folder and CLIP embeds (built once)."""
    if not _CC:
        import tempfile
        from pathlib import Path

        import folder_paths

        from model_patches.customcontrast import VisualAttention
        from model_patches.customcontrast_encoder import EncoderConfig, MFIEncoder
        from model_patches.customcontrast_weights import load_customcontrast_weights, save_customcontrast_weights
        from model_patches.unet_layout import transformer_slots

        folder = Path(tempfile.mkdtemp(prefix="customcontrast_matrix_"))
        folder_paths.add_model_folder_path("customcontrast", str(folder), is_default=True)
        model, clip = c.nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:2]
        tiny_models.shallow_text_encoder(clip)
        good = tiny_models.build_customcontrast_weights(folder / "cc_good.safetensors", model)
        slots = transformer_slots(model)[:-1]  # a UNet with one cross-attention layer fewer
        encoder = MFIEncoder(EncoderConfig(feature_dim=192, layers=len(slots), dim=32, visual_tokens=4, depth=1,
                                           heads=4, fourier_bands=8))
        save_customcontrast_weights(folder / "cc_other_layout.safetensors", encoder, VisualAttention(slots), slots,
                                    image_layers=[1, 2, 3])
        encode = c.nodes.NODE_CLASS_MAPPINGS[CLIPN]()
        embeds = encode.encode(c.clip, img(), "1,2,3", "center_crop", 0.0, 0xFFFFFF, True, False)[0]
        _CC.update(model=model, clip=clip, folder=folder, good=good, weights=load_customcontrast_weights(good),
                   other=load_customcontrast_weights(folder / "cc_other_layout.safetensors"), embeds=embeds,
                   embeds_124=encode.encode(c.clip, img(), "1,2,4", "center_crop", 0.0, 0xFFFFFF, True, False)[0])
    return _CC


def cc_file(c, name, *, tensors=None, **metadata):
    """The good tiny CustomContrast file with ``tensors`` / ``metadata`` changed, in its models folder."""
    import safetensors
    import safetensors.torch

    from model_patches.weight_files import save_weights

    good = cc(c)["good"]
    with safetensors.safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
    content = safetensors.torch.load_file(str(good))
    content.update(tensors or {})
    save_weights(cc(c)["folder"] / name, content, {**meta, **metadata})
    return name


def cc_first_subject(c):
    """The tiny MODEL with one CustomContrast subject ('sks'), for the second Apply's rows."""
    if "first" not in _CC:
        node = c.nodes.NODE_CLASS_MAPPINGS[CC_APPLY]()
        _CC["first"] = node.apply(**CC_DEFAULTS[CC_APPLY](c))[0]
    return _CC["first"]


def cc_second(**overrides):
    """A second subject's Apply on the MODEL that has the first: placeholder 'ohwx' unless overridden."""
    return lambda c: {"model": cc_first_subject(c), "placeholder": "ohwx", **overrides}


CC_DEFAULTS: dict[str, Callable] = {
    CC_LOADER: lambda c: dict(weights_name=cc(c)["good"].name),
    CC_APPLY: lambda c: dict(model=cc(c)["model"], clip=cc(c)["clip"], customcontrast=cc(c)["weights"],
                             subject_embeds=cc(c)["embeds"], prompt="a photo of sks", placeholder="sks", gamma=1.0,
                             start_percent=0.0, end_percent=1.0),
}
DEFAULTS.update(CC_DEFAULTS)

CUSTOMCONTRAST_ROWS: list[Row] = [
    *float_rows(CC_APPLY, "gamma", "start_percent", "end_percent"),
    Row(CC_APPLY, 6, "prompt_without_placeholder", "the prompt does not contain the placeholder word 'sks'",
        args=lambda c: {"prompt": "a photo of a dog"}),
    Row(CC_APPLY, 6, "placeholder_of_several_tokens", "is 5 tokens for the CLIP tokenizer",
        args=lambda c: {"placeholder": "xqzvyk", "prompt": "a photo of xqzvyk"}),
    Row(CC_APPLY, 6, "placeholder_two_words", "the placeholder must be one word",
        args=lambda c: {"placeholder": "my dog"}),
    Row(CC_APPLY, 0, "dinov2_embeds", "needs CLIP vision embeds, but these come from a DINOv2 model",
        args=lambda c: {"subject_embeds": nan_embeds()}),
    Row(CC_APPLY, 0, "embeds_of_other_layers", "was trained on CLIP layers [1, 2, 3]; the embeds have layers "
        "[1, 2, 4]", args=lambda c: {"subject_embeds": cc(c)["embeds_124"]}),
    Row(CC_APPLY, 5, "weights_for_another_layout", "was trained for a UNet with 6 cross-attention layers",
        args=lambda c: {"customcontrast": cc(c)["other"]}),
    Row(CC_APPLY, 0, "start_after_end", "start_percent (0.8) must not be after end_percent (0.2)",
        args=lambda c: {"start_percent": 0.8, "end_percent": 0.2}),
    Row(CC_APPLY, 3, "second_prompt_without_its_placeholder", "the prompt does not contain the placeholder word "
        "'ohwx' (every subject's placeholder must be in it: 'sks', 'ohwx')", args=cc_second(prompt="a photo of sks")),
    Row(CC_APPLY, 3, "second_prompt_without_the_first_placeholder", "the prompt does not contain the placeholder "
        "word 'sks' (every subject's placeholder must be in it", args=cc_second(prompt="a photo of ohwx")),
    Row(CC_APPLY, 3, "second_subject_same_placeholder", "two subjects use the placeholder 'sks'",
        args=cc_second(placeholder="sks", prompt="a photo of sks")),
    *[row for row in mask_rows(CC_APPLY, "location_mask", images="subject_embeds", of="image")
      if row.name != "location_mask_pairing"],
    Row(CC_APPLY, 4, "location_mask_pairing", "location_mask holds 2 masks; expected one",
        args=lambda c: {"location": True, "location_mask": box_mask(batch=2)},
        covers=(("location_mask", "pairing"),)),
    Row(CC_APPLY, 6, "location_mask_without_location", "location_mask is connected but location is off",
        args=lambda c: {"location_mask": box_mask()}),
    Row(CC_APPLY, 6, "location_mask_all_zero", "location_mask is empty (all 0)",
        args=lambda c: {"location": True, "location_mask": torch.zeros(1, 32, 32)}),
    Row(CC_APPLY, 6, "location_mask_out_of_range", "location_mask values must lie in 0..1, got 0..2",
        args=lambda c: {"location": True, "location_mask": box_mask() * 2}),
    Row(CC_APPLY, 0, "inpainting_model", "needs an SD1.5-architecture model",
        args=lambda c: {"model": c.kit.model}),
    Row(CLIPN, 6, "empty_subject_mask", "subject mask 0 is empty",
        args=lambda c: {"mask": torch.zeros(1, 32, 32)}),
    Row(CC_LOADER, 5, "anylogo_file", "is a 'anylogo' file; expected 'customcontrast' weights",
        args=lambda c: {"weights_name": cc_file(c, "cc_anylogo.safetensors", method="anylogo")}),
    Row(CC_LOADER, 5, "newer_format", "has customcontrast format version 9",
        args=lambda c: {"weights_name": cc_file(c, "cc_v9.safetensors", format_version="9")}),
    Row(CC_LOADER, 5, "nan_tensor", "holds 1 non-finite value",
        args=lambda c: {"weights_name": cc_file(c, "cc_nan.safetensors", tensors={
            "visual.output3_0.to_k.weight": poisoned(torch.zeros(320, 768), (4, 5))})}),
    Row(CC_LOADER, 5, "missing_layout", "lacks its encoder_config / layers / image_layers metadata",
        args=lambda c: {"weights_name": cc_file(c, "cc_nolayout.safetensors", layers="null")}),
]
ROWS += CUSTOMCONTRAST_ROWS


@pytest.fixture(scope="module", autouse=True)
def _release_customcontrast_objects():
    """Drop the cached models while ComfyUI is still loaded (a ModelPatcher freed at interpreter exit warns)."""
    yield
    _CC.clear()


# ---- running a row ------------------------------------------------------------------------------------------------

class AnyType(str):
    """ComfyUI's 'any type' convention: a type string equal to every other (the validator compares with !=)."""

    def __ne__(self, other):
        return False


_OBJECTS: dict[str, object] = {}
_SOURCE_TYPES = ("IMAGE", "MASK", "CLIP_VISION", "MODEL", "VAE", "LATENT", "ANYLOGO_WEIGHTS", "SUBJECT_EMBEDS")


class MatrixSource:
    """Test-only node: hands the executor a tensor or model the test prepared (ComfyUI has no node that makes a
    NaN pixel or an empty batch), under the output of its type."""
    CATEGORY = "testing"
    FUNCTION = "give"
    RETURN_TYPES = _SOURCE_TYPES

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    def give(self, key):
        return tuple(_OBJECTS.get(f"{key}:{kind}") for kind in _SOURCE_TYPES)


class MatrixSink:
    CATEGORY = "testing"
    FUNCTION = "take"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (AnyType("*"),)}}

    def take(self, value):
        return {}


def _input_types(node_class) -> dict[str, str]:
    spec = node_class.INPUT_TYPES()
    return {name: entry[0] if isinstance(entry[0], str) else "COMBO" for section in ("required", "optional")
            for name, entry in spec.get(section, {}).items()}


def as_prompt(node_id: str, node_class, args: dict) -> dict:
    """An API-format prompt: widget values inline, every other input from a MatrixSource, output to a sink."""
    types = _input_types(node_class)
    prompt, inputs = {}, {}
    for index, (name, value) in enumerate(args.items()):
        kind = types[name]
        if kind in _SOURCE_TYPES:
            key = f"src{index}"
            _OBJECTS[f"{key}:{kind}"] = value
            prompt[key] = {"class_type": "SC_MatrixSource", "inputs": {"key": key}}
            inputs[name] = [key, _SOURCE_TYPES.index(kind)]
        else:
            inputs[name] = value
    prompt["node"] = {"class_type": node_id, "inputs": inputs}
    prompt["sink"] = {"class_type": "SC_MatrixSink", "inputs": {"value": ["node", 0]}}
    return prompt


@dataclass
class Ctx:
    nodes: object
    clip: object
    dino: object
    kit: object
    plain_model: object
    weights_dir: object
    good_file: object
    good_weights: object
    unet_key: str
    recorded: object


@pytest.fixture(scope="module")
def ctx(comfy, anylogo_kit, tiny_cache_dir, tmp_path_factory):
    import folder_paths

    from model_patches.anylogo_weights import load_anylogo_weights

    comfy.NODE_CLASS_MAPPINGS.update({"SC_MatrixSource": MatrixSource, "SC_MatrixSink": MatrixSink})
    weights_dir = tmp_path_factory.mktemp("anylogo_weights")
    folder_paths.add_model_folder_path("anylogo", str(weights_dir), is_default=True)
    good = tiny_models.build_anylogo_weights(tiny_cache_dir / "anylogo" / "w.safetensors")
    good_file = weights_dir / "good.safetensors"
    good_file.write_bytes(good.read_bytes())
    weights = load_anylogo_weights(good_file)
    plain = comfy.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[0]
    yield Ctx(comfy, tiny_models.tiny_clip_vision(seed=0), tiny_models.tiny_dinov2(seed=0), anylogo_kit, plain,
              weights_dir, good_file, weights, next(iter(weights.unet)), anylogo_kit.apply(record_attention=True))
    for key in ("SC_MatrixSource", "SC_MatrixSink"):
        comfy.NODE_CLASS_MAPPINGS.pop(key, None)
    _OBJECTS.clear()


def run_row(row: Row, c: Ctx):
    if row.run is not None:
        return row.run(c)
    node_class = c.nodes.NODE_CLASS_MAPPINGS[row.node]
    args = {**DEFAULTS[row.node](c), **row.args(c)}
    if row.executor:
        from standalone.runner import run_workflow

        return run_workflow(as_prompt(row.node, node_class, args))
    return getattr(node_class(), node_class.FUNCTION)(**args)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_gets_a_clear_message(ctx, row):
    with pytest.raises(Exception) as caught:
        run_row(row, ctx)
    message = str(caught.value)
    assert row.fragment in message, f"{row.id}: expected {row.fragment!r} in the message, got " \
                                    f"{type(caught.value).__name__}: {message}"
    if not row.executor and row.run is None:
        assert isinstance(caught.value, ValueError), f"{row.id}: {type(caught.value).__name__}: {message}"


@pytest.mark.parametrize("node", sorted(DEFAULTS))
def test_the_matrix_defaults_are_valid_calls(ctx, node):
    """Every row changes one thing of a call that works; so a row fails for its own bad input only."""
    node_class = ctx.nodes.NODE_CLASS_MAPPINGS[node]
    getattr(node_class(), node_class.FUNCTION)(**DEFAULTS[node](ctx))


def test_a_default_call_runs_through_the_executor_too(ctx):
    from standalone.runner import run_workflow

    node_class = ctx.nodes.NODE_CLASS_MAPPINGS[FREQ]
    run_workflow(as_prompt(FREQ, node_class, DEFAULTS[FREQ](ctx)))  # raises on any validation or node error


def test_every_pack_node_is_in_the_matrix(pack_nodes):
    """New nodes join: each node has rows, and each of its IMAGE, MASK and FLOAT inputs has the generic ones."""
    rows_of = {}
    for row in ROWS:
        rows_of.setdefault(row.node, set()).update(row.covers)
    missing_nodes = sorted(set(pack_nodes) - set(rows_of))
    assert not missing_nodes, f"nodes without rows in the bad-input matrix: {missing_nodes}"
    assert set(pack_nodes) <= set(DEFAULTS), f"nodes without a valid default call: {set(pack_nodes) - set(DEFAULTS)}"
    wanted = {"IMAGE": ("nan", "inf", "empty", "rgba", "zero_width"), "MASK": ("nan", "empty", "pairing"),
              "FLOAT": ("nan",)}
    missing = []
    for node_id, node_class in pack_nodes.items():
        for name, kind in _input_types(node_class).items():
            missing += [f"{node_id}.{name}:{check}" for check in wanted.get(kind, ())
                        if (name, check) not in rows_of[node_id]]
    assert not missing, f"inputs without their generic bad-input rows: {missing}"


def test_every_issue_class_has_rows():
    assert {row.cls for row in ROWS} >= {1, 2, 3, 4, 5, 6}
    assert sum(row.executor for row in ROWS) >= 5


# ---- class 4: what a correct pairing does -------------------------------------------------------------------------

def test_apply_takes_the_mask_of_the_subject_it_encodes(ctx):
    """Two subjects with two masks: the node encodes the first subject with the first mask (not all masks)."""
    subjects = torch.cat([img(), img(fill=0.2)])
    masks = torch.cat([box_mask(), torch.zeros(1, 32, 32)])
    both = ctx.kit.apply(subject=subjects, subject_mask=masks)
    first = ctx.kit.apply(subject=subjects[:1], subject_mask=masks[:1])
    latent = lambda m: m.get_attachment("subject_customization.anylogo").subject  # noqa: E731
    assert torch.equal(latent(both), latent(first))


def test_the_nonfinite_summary_names_count_kinds_and_first_position():
    from model_patches.finite import nonfinite_summary

    t = torch.zeros(2, 3)
    assert nonfinite_summary(t) is None
    t[1, 0], t[1, 2] = NAN, -INF
    assert nonfinite_summary(t, ("row", "col")) == "2 non-finite values (1 NaN, 1 inf) of 6, the first at row 1, col 0"
    assert nonfinite_summary(torch.zeros(3, dtype=torch.long)) is None
