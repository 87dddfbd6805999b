#!/usr/bin/env bash
# find_comfyui PACK_ROOT: prints the ComfyUI checkout to use, or explains how to get one and fails.
# Same rule as the Python side (model_patches/host.py): COMFYUI_PATH, else the ComfyUI that contains the pack.
find_comfyui() {
  local pack_root="$1" candidate
  if [ -n "${COMFYUI_PATH:-}" ]; then
    candidate="$COMFYUI_PATH"
  else
    candidate="$(cd "$pack_root/../.." && pwd)"
  fi
  if [ -f "$candidate/comfy/model_patcher.py" ] && [ -f "$candidate/nodes.py" ]; then
    echo "$candidate"
    return 0
  fi
  if [ -z "${COMFYUI_PATH:-}" ] && [ -n "${CLONE_COMFYUI:-}" ]; then
    local target="$pack_root/.comfyui"
    echo "no ComfyUI found; cloning ComfyUI v0.3.64 into $target (CLONE_COMFYUI is set)" >&2
    git clone --depth 1 --branch v0.3.64 https://github.com/Comfy-Org/ComfyUI "$target" >&2 || return 1
    echo "$target"
    return 0
  fi
  cat >&2 <<MSG
No ComfyUI found at '${candidate}'.
The pack needs a ComfyUI checkout (0.3.64 is the tested version). Either
  - set COMFYUI_PATH=/path/to/ComfyUI, or
  - place this pack in <ComfyUI>/custom_nodes/<pack>, or
  - with internet access, set CLONE_COMFYUI=1 to clone ComfyUI v0.3.64 into .comfyui/ inside the pack.
MSG
  return 1
}
