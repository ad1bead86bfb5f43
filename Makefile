# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Each creates .venv if missing (torch pinned first so pip takes the local CPU build).
PY := .venv/bin/python
TORCH := torch==2.13.0

.PHONY: train test test-extras gpu-wheels venv clean

# The stamp depends on pyproject.toml: a change there (a new package or dependency) reinstalls into the
# existing .venv, where an editable install would otherwise not see a newly listed package.
VENV := .venv/.installed
$(VENV): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)

# A fresh run directory each time, so the demo always trains (resuming an old run is the default).
train: $(VENV)
	.venv/bin/shardwright train configs/llm/tiny.yaml --nproc-per-node 2 --set run.dir=runs/llm-tiny/$$(date +%Y%m%d-%H%M%S)

# Two pytest workers, whole test files each (a file's multi-process world and its checks stay together). On the
# 2-core CI machine the whole run took 16-20 min this way against 18.5-24.4 min serially. Then the tests of the
# optional packages, which skip in the main venv, in theirs (about a minute with its build): CI runs them too.
test: $(VENV)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20 tests
	$(MAKE) --no-print-directory test-extras

# The optional packages that install on CPU, in a venv of their own: DeepSpeed (it builds from source, about a
# minute; real ZeRO engines on CPU: the checkpoint import, parallel.engine=deepspeed's config checks and runs) and
# flash-linear-attention with Triton (a 1 GB wheel; its model classes build and load our DeltaNet exports on CPU,
# where its Triton kernels do not run). Their tests skip in the main venv and run here; `make test` ends with them.
EXTRAS_PY := .venv-extras/bin/python
EXTRAS_VENV := .venv-extras/.installed
FLA_CPU := flash-linear-attention[cpu]==0.6.0
$(EXTRAS_VENV): pyproject.toml
	test -x $(EXTRAS_PY) || python3 -m venv .venv-extras
	$(EXTRAS_PY) -m pip install -q --upgrade pip
	$(EXTRAS_PY) -m pip install -q $(TORCH)
	$(EXTRAS_PY) -m pip install -q -e '.[dev,deepspeed]' '$(FLA_CPU)'
	touch $@

test-extras: $(EXTRAS_VENV)
	DS_ACCELERATOR=cpu $(EXTRAS_PY) -m pytest -q tests/unit/test_deepspeed_import.py tests/unit/test_deepspeed_config.py \
		tests/distributed/test_deepspeed_engine.py tests/unit/test_hf_deltanet.py

# The packages benchmarks/gpu_suite.py uses beyond torch, as wheels for a GPU machine without network (its own
# Python: GPU_PYTHON), carried there as .whl (docs/performance.md has the commands on both sides).
GPU_PYTHON := 3.12
GPU_WHEELS := megatron-core==0.16.1 fla-core==0.6.0 flash-linear-attention==0.6.0
gpu-wheels: $(VENV)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
		--platform manylinux_2_28_x86_64 --platform any -d .whl $(GPU_WHEELS)

clean:
	rm -rf .venv .venv-extras runs .whl
