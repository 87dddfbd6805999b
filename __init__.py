"""Subject Customization for ComfyUI: AnyLogo, EqDiff, P3S and CustomContrast on Stable Diffusion 1.5.

ComfyUI entry point: node mappings, display names, the model folders and the example workflows' input images.
Nothing else lives here.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.example_inputs import install_example_inputs
from .nodes.model_folders import register_model_folders

register_model_folders()
install_example_inputs()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
