"""Subject Customization for ComfyUI: AnyLogo, EqDiff, P3S and CustomContrast on Stable Diffusion 1.5.

ComfyUI entry point: node mappings, display names and the model folders. Nothing else lives here.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.model_folders import register_model_folders

register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
