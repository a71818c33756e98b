# The whole set-up on a fresh machine is `make train TASK=...` or `make test`: both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TASK ?= walker2d
ALGO ?= sac
ARGS ?=
RESUME ?=
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install train test ui bench-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# make train TASK=hopper ALGO=sac ARGS="--model.gamma 0.98" [RESUME=runs/checkpoints/<run>/last.ckpt]
train: install
	@test -f conf/task/$(TASK).yaml || { echo "error: unknown task '$(TASK)'; known tasks: $$(ls conf/task | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	@test -f conf/algo/$(ALGO).yaml || { echo "error: unknown algo '$(ALGO)'; known algos: $$(ls conf/algo | sed 's/\.yaml$$//' | tr '\n' ' ')" >&2; exit 2; }
	$(PY) -m mpdp_lightning fit --config conf/base.yaml --config conf/algo/$(ALGO).yaml \
		--config conf/task/$(TASK).yaml $(if $(RESUME),--ckpt_path $(RESUME)) $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Cost of the world-model phase (ms per epoch, batched ensemble vs a per-member loop).
bench-model: install
	$(PY) -m mpdp_lightning.benchmarks.world_model $(ARGS)

# The MLflow UI over the project's run store, on this machine only.
ui: install
	$(PY) -m mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db
