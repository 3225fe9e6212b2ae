# The two commands of the README. Each sets up what it needs on a fresh machine:
# a venv with the pinned dependencies (torch 2.13.0 CPU build) and, where no
# Vulkan driver exists, Mesa's lavapipe.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# lavapipe complains on stderr when XDG_RUNTIME_DIR is unset; give it one.
export XDG_RUNTIME_DIR ?= /tmp/executorch_wgpu-xdg

.PHONY: demo test setup native relink

demo: setup
	$(PY) -m executorch_wgpu demo

# mypy first (configured in pyproject.toml): a type error fails fast, before the slow GPU tests.
test: setup
	$(PY) -m mypy -p executorch_wgpu
	$(PY) -m pytest -q tests

setup: $(VENV)/.linked native
	@bash .ci/ensure_vulkan.sh
	@mkdir -p -m 700 $(XDG_RUNTIME_DIR)

# The native delegate (CMakeLists.txt -> build/native/libexecutorch_wgpu_native.so),
# which executorch_wgpu.native loads so ExecuTorch's own runtime runs our .pte.
# Where it cannot be built the Python runtime still works and the native tests
# skip, saying why -- unless EXECUTORCH_WGPU_REQUIRE_NATIVE=1 (CI), which fails.
native: $(VENV)/.linked
	@{ bash .ci/ensure_build_tools.sh \
	   && { [ -f build/native/CMakeCache.txt ] || cmake -S . -B build/native -DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null; } \
	   && cmake --build build/native -j 4 >/dev/null; } \
	 || { echo "native delegate NOT built (see above); its tests will skip" >&2; [ "$${EXECUTORCH_WGPU_REQUIRE_NATIVE:-0}" != 1 ]; }

# torch first and pinned: a looser request lets pip pull a multi-GB CUDA build.
# The project itself is installed editable in setuptools' strict mode: a tree of
# links (build/__editable__.*) on a plain path entry, so Python, mypy and editors
# resolve every module the same static way, under the one name its path spells.
EDITABLE := --config-settings editable_mode=strict -e
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 'setuptools>=77'
	$(VENV)/bin/pip install -q $(EDITABLE) '.[test,models]'
	touch $@

# The link tree holds the files that existed when it was made. Adding or removing
# a file changes its folder's mtime, and that relinks (a second, no-deps install);
# so does a link tree that is gone (rm -rf build).
PACKAGE_DIRS := . backend backend/graph backend/serialization backend/serialization/generated \
	backend/serialization/generated/wggr backend/serialization/generated/wgq4 runtime_py shaders tools
LINK_TREE := $(wildcard build/__editable__.*/executorch_wgpu/__init__.py)
$(VENV)/.linked: $(VENV)/.installed $(PACKAGE_DIRS) $(if $(LINK_TREE),,relink)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation $(EDITABLE) .
	touch $@
