"""The pack's weight files: safetensors with metadata, written atomically, read with clear errors.

Every file carries ``method``, ``format_version`` and ``base_architecture`` in its safetensors metadata, plus
whatever the method adds (training config, trigger word, layers). Readers refuse another method's file, a newer
format, or a truncated/corrupt file with a message that names the file and what was expected.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .finite import nonfinite_summary


class WeightFileError(ValueError):
    """A weight file is missing, corrupt, of another method/architecture/version, or lacks keys."""


def default_file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's temporary files are 0o600, and a
    renamed export must stay readable by e.g. a ComfyUI server running as another user."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside ``path``; on success it is flushed to disk, made readable like a plain file
    and renamed over ``path``, so a reader never sees half a file. On any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``tensors`` with string metadata to ``path`` atomically (temporary file, then rename)."""
    import safetensors.torch

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_write(path) as tmp:
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                                    metadata=meta)
    return Path(path)


def read_metadata(path) -> dict[str, str]:
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise WeightFileError(f"weight file not found: {path}") from None
    except Exception as e:  # safetensors raises its own error types for truncated or non-safetensors files
        raise WeightFileError(f"{Path(path).name} is not a readable safetensors file ({e})") from None


def load_weights(path, *, method: str, supported_version: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one of our files, after checking it belongs to ``method`` and is not newer."""
    import safetensors.torch

    metadata = read_metadata(path)
    name = Path(path).name
    found = metadata.get("method")
    if found != method:
        what = f"a {found!r} file" if found else "a file without the pack's metadata (not exported by our trainer)"
        raise WeightFileError(f"{name} is {what}; expected {method!r} weights")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise WeightFileError(f"{name} has a malformed format_version {metadata.get('format_version')!r}") from None
    if not 1 <= version <= supported_version:
        raise WeightFileError(f"{name} has {method} format version {version}; this pack reads versions "
                              f"1..{supported_version} — update the pack")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise WeightFileError(f"{name} could not be read ({e})") from None
    return tensors, metadata


def require_keys(tensors: dict, keys, source: str) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise WeightFileError(f"{source} lacks {len(missing)} required tensors, e.g. {missing[:3]}")


def require_usable_tensors(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor of a file is floating point and finite; else the file and the first bad key are named.

    A NaN weight would otherwise load without a word and turn every sample NaN."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise WeightFileError(f"{source}: tensor {key!r} has dtype {tensor.dtype}; expected floating-point "
                                  "weights (re-export the file with the pack's trainer)")
        summary = nonfinite_summary(tensor)
        if summary is not None:
            raise WeightFileError(f"{source}: tensor {key!r} {tuple(tensor.shape)} holds {summary}; expected "
                                  "finite weights. The training diverged or the file is damaged: export again "
                                  "from the last good checkpoint")


def require_shape(tensors: dict[str, torch.Tensor], key: str, shape: tuple, source: str, meaning: str) -> None:
    """``tensors[key]`` has ``shape`` (None = any size on that axis); ``meaning`` says what the tensor is."""
    found = tuple(tensors[key].shape)
    if len(found) != len(shape) or any(want is not None and want != got for want, got in zip(shape, found)):
        wanted = "[" + ", ".join("any" if want is None else str(want) for want in shape) + "]"
        raise WeightFileError(f"{source}: tensor {key!r} has shape {list(found)}; expected {wanted}, {meaning}. "
                              "The file was not exported by this pack's trainer, or is damaged")


def metadata_json(metadata: dict, key: str, default=None):
    value = metadata.get(key)
    if value is None:
        return default
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def require_supported_architecture(metadata: dict, source: str, method: str, supported=None) -> None:
    """At load: the file's ``base_architecture`` is one the method supports (all SD1.5 UNets by default)."""
    from .unet_layout import ARCHITECTURES

    supported = sorted(ARCHITECTURES.values()) if supported is None else list(supported)
    if metadata.get("base_architecture") not in supported:
        raise WeightFileError(f"{source} was trained for {metadata.get('base_architecture')!r}; this pack's {method} "
                              f"supports {supported}")


def require_architecture_of(model, architecture: str, source: str, advice: str) -> None:
    """At apply: the MODEL's UNet is the architecture the file was trained for (4- vs 9-channel SD1.5)."""
    from .unet_layout import architecture_of, diffusion_model_of

    wanted = architecture_of(model)
    if architecture != wanted:
        in_channels = diffusion_model_of(model).input_blocks[0][0].in_channels
        raise WeightFileError(f"{source} is for {architecture} models, but this MODEL is {wanted} "
                              f"({in_channels} input channels); {advice}")
