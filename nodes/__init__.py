"""ComfyUI node classes of the pack. Each module exports its own mappings; this file only gathers them."""
from . import anylogo, customcontrast, encoders, eqdiff, eqdiff_train, frequency, p3s, p3s_train, points, similarity

_MODULES = (frequency, points, encoders, anylogo, similarity, eqdiff, eqdiff_train, p3s, p3s_train, customcontrast)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in _MODULES:
    _clash = NODE_CLASS_MAPPINGS.keys() & _module.NODE_CLASS_MAPPINGS.keys()
    if _clash:
        raise RuntimeError(f"node ids defined twice in the pack: {sorted(_clash)}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
