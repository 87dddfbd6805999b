"""LPIPS (Zhang et al. 2018, version 0.1) from a local safetensors file: no download at run time.

The ``lpips`` package ships only its linear heads and fetches the backbone (torchvision's ImageNet AlexNet or
VGG16) from the internet on first use. Here the whole network comes from one file the user supplies, in
``models/lpips/`` (see README "Evaluation" and ``tools/convert_lpips_weights.py``):

* ``features.<i>.weight`` / ``.bias``: torchvision's ``alexnet().features`` (or ``vgg16().features``) keys;
* ``lin<k>.weight`` [1, C_k, 1, 1]: the five learned non-negative 1x1 heads (the package's ``lin<k>.model.1``);
* metadata ``backbone`` = ``alex`` or ``vgg16``.

The computation is the package's ``LPIPS(net=..., version='0.1', spatial=False)`` in eval mode: inputs in 0..1 →
``2x-1`` → ScalingLayer ``(x - shift) / scale`` → backbone ReLU outputs at five depths → unit-normalise each
feature over channels (``x / (sqrt(sum x^2) + 1e-10)``) → squared difference → 1x1 head → spatial mean → sum.
"""
from __future__ import annotations

from pathlib import Path

import torch

LPIPS_VERSION = "0.1"
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# backbone: (torchvision builder, features index after which each of the five taps is taken, channels)
BACKBONES = {
    "alex": ("alexnet", (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg16": ("vgg16", (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


class LPIPSWeightsError(ValueError):
    """The LPIPS weights file is missing or not a usable LPIPS network; the message names the file."""


class LPIPS(torch.nn.Module):
    def __init__(self, backbone: str = "alex"):
        super().__init__()
        import torchvision

        if backbone not in BACKBONES:
            raise LPIPSWeightsError(f"LPIPS backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        builder, self.taps, channels = BACKBONES[backbone]
        self.backbone = backbone
        self.features = getattr(torchvision.models, builder)(weights=None).features[:self.taps[-1] + 1]
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, wanted = [], set(self.taps)
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in wanted:
                out.append(x)
        return out

    @torch.no_grad()
    def distance(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in 0..1 twice → [N] LPIPS distances (0 for identical images)."""
        device = next(self.parameters()).device
        prep = lambda x: ((2 * x.to(device, torch.float32) - 1) - self.shift) / self.scale  # noqa: E731
        total = torch.zeros(x0.shape[0], device=device)
        for f0, f1, lin in zip(self._taps(prep(x0)), self._taps(prep(x1)), self.lins):
            n0 = f0 / (f0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((n0 - n1) ** 2).mean(dim=(1, 2, 3))
        return total.cpu()

    def weights(self) -> dict[str, torch.Tensor]:
        sd = {f"features.{k}": v for k, v in self.features.state_dict().items()}
        sd.update({f"lin{k}.weight": lin.weight for k, lin in enumerate(self.lins)})
        return sd


def save_lpips(net: LPIPS, path) -> Path:
    """Write ``net`` in the layout ``load_lpips`` reads (temp file, then rename)."""
    import os

    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file({k: v.detach().contiguous() for k, v in net.weights().items()}, str(tmp),
                                {"method": "lpips", "backbone": net.backbone, "lpips_version": LPIPS_VERSION})
    os.replace(tmp, path)
    return path


def load_lpips(path, device: str | torch.device = "cpu") -> LPIPS:
    """The LPIPS network of ``path`` (a safetensors file); clear errors for a missing or wrong file."""
    import safetensors
    import safetensors.torch

    path = Path(path)
    if not path.is_file():
        raise LPIPSWeightsError(
            f"LPIPS weights file not found: {path}. LPIPS needs a local file (nothing is downloaded): put an "
            "LPIPS safetensors file (backbone + linear heads, made with tools/convert_lpips_weights.py from the "
            "lpips package's weights/v0.1/alex.pth and torchvision's alexnet weights) in ComfyUI's models/lpips "
            "folder, or leave LPIPS off")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises several kinds for a broken header
        raise LPIPSWeightsError(f"{path.name} cannot be read as a safetensors file ({e})") from None
    backbone = metadata.get("backbone", "alex")
    net = LPIPS(backbone)
    wanted = net.weights()
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise LPIPSWeightsError(f"{path.name} is not an LPIPS ({backbone}) weights file: it lacks {len(missing)} "
                                f"tensors, e.g. {missing[:3]}")
    for key, value in wanted.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(value.shape):
            raise LPIPSWeightsError(f"{path.name}: tensor {key!r} has shape {list(got.shape)}; expected "
                                    f"{list(value.shape)} for the {backbone} backbone")
        bad = int((~torch.isfinite(got.float())).sum())
        if bad:
            raise LPIPSWeightsError(f"{path.name}: tensor {key!r} holds {bad} non-finite values (NaN/inf)")
    net.features.load_state_dict({k[len("features."):]: v.float() for k, v in tensors.items()
                                  if k.startswith("features.")})
    for k, lin in enumerate(net.lins):
        lin.weight.data.copy_(tensors[f"lin{k}.weight"].float())
    return net.to(device)


def random_lpips(backbone: str = "alex", seed: int = 0) -> LPIPS:
    """The real architecture with seeded random weights (non-negative heads, as trained ones are): for tests."""
    net = LPIPS(backbone)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if p.ndim > 1 else 0.01))
        for lin in net.lins:
            lin.weight.abs_()
    return net
