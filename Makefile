# The two commands of the README. Both create or reuse the development venv (tools/ensure_env.sh), which
# lives outside the clone, keyed by a hash of the requirement files.
SHELL := /bin/bash
.ONESHELL:
.PHONY: test demo env

env:
	@tools/ensure_env.sh >/dev/null

test:
	@set -euo pipefail
	venv="$$(tools/ensure_env.sh | tail -n 1)"
	source tools/find_comfyui.sh; export COMFYUI_PATH="$$(find_comfyui "$$PWD")"
	status=0; "$$venv/bin/python" -m pytest $(PYTEST_ARGS) || status=$$?
	if [ "$$status" -eq 5 ]; then echo "pytest collected no tests: the suite must not be empty" >&2; exit 1; fi
	exit "$$status"

demo:
	@set -euo pipefail
	venv="$$(tools/ensure_env.sh | tail -n 1)"
	source tools/find_comfyui.sh; export COMFYUI_PATH="$$(find_comfyui "$$PWD")"
	"$$venv/bin/python" -m standalone.demo $(DEMO_ARGS)
