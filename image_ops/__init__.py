"""Tensor-in, tensor-out image helpers (frequency split, point-to-mask, hierarchical encoders).

No ComfyUI types here: nodes adapt IMAGE/MASK layouts, trainers call these directly."""
