"""Per-method weight folders under ComfyUI's models/ directory, registered with folder_paths."""
import os

import folder_paths

# folder name -> what goes there (shown in the README)
METHOD_FOLDERS = {
    "anylogo": "AnyLogo fine-tuned UNet weights + DINOv2 projection",
    "eqdiff": "EqDiff per-subject residual reference attention weights",
    "p3s": "P3S injection copy, RNGR encoder and injection convs",
    "customcontrast": "CustomContrast MFI encoder and visual cross-attention weights",
}
# evaluation weights (not a method's): listed by the Subject Similarity node and python -m train.evaluate
EVALUATION_FOLDERS = {
    "lpips": "LPIPS network (backbone + linear heads) for the Subject Similarity scores",
}
WEIGHT_EXTENSIONS = {".safetensors"}


def register_model_folders() -> None:
    """Add models/<method> as the default folder of each method, keeping paths the user configured.

    extra_model_paths.yaml is read before custom nodes load, so a user's entry may already have created the
    folder name (with an empty extension set, which ComfyUI treats as "any file"); we keep its paths, add ours
    behind them unless already present, and restrict the listing to safetensors files.
    """
    for name in (*METHOD_FOLDERS, *EVALUATION_FOLDERS):
        default = os.path.join(folder_paths.models_dir, name)
        paths, _extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        paths = list(paths)
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(WEIGHT_EXTENSIONS))
