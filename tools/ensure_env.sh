#!/usr/bin/env bash
# Creates or reuses the development venv and prints its path on the last line of stdout.
#
# The venv lives outside the clone (so a fresh CI clone reuses it) and is keyed by a hash of every
# requirement file that shapes it, so a change to any of them builds a new one instead of patching an old one.
# Order matters: torch is installed first from an exact pin, because ComfyUI's requirements name a bare
# `torch`/`torchvision`, which pip would otherwise satisfy with a multi-GB download of the newest release.
set -euo pipefail

pack_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=tools/find_comfyui.sh
source "$pack_root/tools/find_comfyui.sh"
comfy="$(find_comfyui "$pack_root")"

TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PYTHON="${PYTHON:-python3}"
cache_root="${SUBJECT_CUSTOMIZATION_VENV_ROOT:-$HOME/.cache/comfyui-subject-customization}"

key="$(cat "$comfy/requirements.txt" "$pack_root/requirements.txt" "$pack_root/requirements-dev.txt" \
        <(echo "$TORCH_SPEC") <("$PYTHON" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)"
venv="$cache_root/venv-$key"

# The frontend test drives the system Chromium (Debian's package): never a browser downloaded by a test tool.
ensure_chromium() {
  local candidate
  for candidate in "${SUBJECT_CUSTOMIZATION_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser /usr/bin/google-chrome; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && return 0
  done
  local sudo=()
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo=(sudo -n)
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ ${#sudo[@]} -gt 0 ]; }; then
    echo "installing Debian's chromium for the frontend test (apt-get)" >&2
    if "${sudo[@]}" apt-get install -y -qq chromium >&2 2>/dev/null || \
       { "${sudo[@]}" apt-get update -qq >&2 && "${sudo[@]}" apt-get install -y -qq chromium >&2; }; then
      return 0
    fi
  fi
  echo "warning: no Chromium found and it could not be installed here; tests/test_frontend.py will fail." >&2
  echo "  Install it (Debian/Ubuntu: apt-get install chromium) or set SUBJECT_CUSTOMIZATION_CHROMIUM." >&2
}
ensure_chromium

if [ -f "$venv/.complete" ]; then
  echo "reusing venv $venv" >&2
  echo "$venv"
  exit 0
fi

echo "building venv $venv (first run on this machine: several minutes)" >&2
rm -rf "$venv"
mkdir -p "$cache_root"
"$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "installing $TORCH_SPEC" >&2
  # shellcheck disable=SC2086
  "${pip[@]}" $TORCH_SPEC
fi

# ComfyUI's own requirements, minus the torch family (already pinned above; torchaudio is optional for SD1.5).
grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$comfy/requirements.txt" > "$venv/comfyui-requirements.txt"
"${pip[@]}" -r "$venv/comfyui-requirements.txt" -r "$pack_root/requirements.txt" -r "$pack_root/requirements-dev.txt"

touch "$venv/.complete"
echo "$venv"
