"""`python -m train`: show the trainers and the environment they would run in."""
import argparse
import importlib
import pkgutil
import sys

import train


def _trainers() -> list[str]:
    skip = {"__main__", "evaluate"}
    return sorted(m.name for m in pkgutil.iter_modules(train.__path__)
                  if not m.ispkg and m.name not in skip and hasattr(importlib.import_module(f"train.{m.name}"),
                                                                      "main"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--where", action="store_true", help="print the host and modules the trainers resolve")
    args = parser.parse_args(argv)
    if args.where:
        import comfyui_version
        import nodes
        import torch

        print(f"comfyui: {train.COMFYUI_ROOT} (version {comfyui_version.__version__})")
        print(f"nodes module: {nodes.__file__}")
        print(f"torch: {torch.__version__}, cuda available: {torch.cuda.is_available()}")
        return 0
    names = _trainers()
    print("trainers:", ", ".join(names) if names else "none yet")
    print("usage: torchrun --nproc_per_node=N -m train.<method> --config FILE [overrides]")
    print("evaluation (CLIP-I, CLIP-T, DINO-I, LPIPS): python -m train.evaluate --help")
    return 0


if __name__ == "__main__":
    sys.exit(main())
