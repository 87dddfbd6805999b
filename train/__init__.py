"""Standalone trainers: one shared engine plus one module per method.

Run from the pack root as ``python -m train.<method> …`` (or under torchrun). Importing this package first
puts ComfyUI in front of sys.path, so ``import nodes`` inside ComfyUI keeps meaning ComfyUI's nodes.py and not
the pack's own ``nodes/`` package that sits in the current directory.
"""
from standalone.host import bootstrap as _bootstrap

COMFYUI_ROOT = _bootstrap()
