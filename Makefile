# The whole set-up on a fresh machine is `make train TASK=...` or `make test`: both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= walker2d
ALGO ?= mpdp
PRESET ?= auto
ARGS ?=
RESUME ?=
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install install-sweep train sweep compare test ui bench bench-model bench-seeds clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# make train TASK=hopper [ALGO=mpdp|sac|mbpo] [PRESET=auto|quick|paper] ARGS="--model.beta 0.7"
#            [RESUME=runs/checkpoints/<run>/last.ckpt] [SEEDS=0,1,2]
# SEEDS: those seeds in one process, one update for all (a group: docs/seed-groups.md; SAC, MPDP),
# each seed its own MLflow run.
# MPDP and MBPO run their paper preset where torch sees a GPU and their quick preset on a
# CPU-only machine (conf/preset/<algo>/); SAC has one size. COPlanner: ARGS="--coplanner.enabled true".
train: install
	@test -f conf/task/$(TASK).yaml || { echo "error: unknown task '$(TASK)'; known tasks: $$(ls conf/task | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	@test -f conf/algo/$(ALGO).yaml || { echo "error: unknown algo '$(ALGO)'; known algos: $$(ls conf/algo | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	@preset=$(PRESET); \
	if [ "$$preset" = auto ]; then preset=$$($(PY) -c "import torch; print('paper' if torch.cuda.is_available() else 'quick')"); fi; \
	preset_config=; \
	if [ -d conf/preset/$(ALGO) ]; then \
		test -f conf/preset/$(ALGO)/$$preset.yaml || { echo "error: unknown preset '$$preset' for $(ALGO); known presets: auto $$(ls conf/preset/$(ALGO) | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }; \
		echo "$$(echo $(ALGO) | tr a-z A-Z) on $(TASK), $$preset preset ($$(sed -n 's/^# expected: //p' conf/preset/$(ALGO)/$$preset.yaml))"; \
		preset_config="--config conf/preset/$(ALGO)/$$preset.yaml"; \
	fi; \
	$(PY) -m mpdp_lightning fit --config conf/base.yaml --config conf/algo/$(ALGO).yaml \
		--config conf/task/$(TASK).yaml $$preset_config $(if $(RESUME),--ckpt_path $(RESUME)) $(if $(SEEDS),--seeds $(SEEDS)) $(ARGS)

# Ray Tune for sweeps: an optional extra, not needed by train or test
install-sweep: $(VENV)/.installed-sweep

$(VENV)/.installed-sweep: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,sweep]'
	touch $@

# make sweep SWEEP=conf/sweep/ip-sac-vs-mpdp.yaml [ARGS="--dry-run"]: every task x algo x seed x
# grid value is a Ray Tune trial running the same training as make train; run it again to resume.
SWEEP ?= conf/sweep/ip-sac-vs-mpdp.yaml
sweep: install-sweep
	$(PY) -m mpdp_lightning.experiments.sweep $(SWEEP) $(ARGS)

# make compare ARGS="--experiment ip-sac-vs-mpdp --sweep ip-sac-vs-mpdp --threshold 900 --out figures"
# From the committed trial records, without MLflow: ARGS="--records benchmarks/results --sweep ip-all-algos"
compare: install
	$(PY) -m mpdp_lightning.experiments.compare $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Cost of one update phase by phase (SAC, MPDP quick and paper shapes; eager and compiled;
# masked and compacted rows), FLOPs against a matmul of the same shapes, model-fit epochs at
# 10k/50k/200k rows and the env steps per hour they imply for walker2d at the paper preset.
# make bench [ARGS="--device cuda --out bench.json"]
bench: install
	$(PY) -m mpdp_lightning.benchmarks.update $(ARGS)

# Cost of the world-model phase (ms per epoch, batched ensemble vs a per-member loop).
bench-model: install
	$(PY) -m mpdp_lightning.benchmarks.world_model $(ARGS)

# N seeds' update in one group against one seed's, side by side (algorithms/seed_group.py)
# make bench-seeds [ARGS="--device cuda --seeds 1,4,8,16 --out seeds.json"]
bench-seeds: install
	$(PY) -m mpdp_lightning.benchmarks.seed_group $(ARGS)

# The MLflow UI over the project's run store, on this machine only.
ui: install
	$(PY) -m mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db
