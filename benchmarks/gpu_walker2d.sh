#!/usr/bin/env bash
# Issue 20's whole-run figures on a GPU: MPDP at the paper preset on walker2d, the update run the
# four ways (eager, compiled, CUDA graph, both; both again with --model.tf32 false), then SAC,
# each as env steps per hour after the warm-up, model fits included, and `make bench`'s kernels.
# On the GPU machine, after `bash .whl/measure.sh` installed the wheels into /tmp/site
# (../shared/gpu/run-on-gpu.md):   bash benchmarks/gpu_walker2d.sh      (BUDGET caps the pass, s)
set -u
T0=$(date +%s); DL=$((T0 + ${BUDGET:-540}))
cap() { local l=$((DL - $(date +%s))); local m=$1; [ "$l" -lt "$m" ] && m=$l; [ "$m" -lt 5 ] && m=5; echo "$m"; }
R=${OUT:-results}; mkdir -p "$R"; LOG=$R/walker2d.log
export PYTHONPATH=/tmp/site:src MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
say() { echo "=== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
URI="sqlite:///$PWD/walker2d.db"
F="python3 -m mpdp_lightning fit --config conf/base.yaml --config conf/task/walker2d.yaml"
P="--config conf/algo/mpdp.yaml --config conf/preset/mpdp/paper.yaml"
O="--trainer.accelerator gpu --trainer.logger.init_args.tracking_uri $URI --evaluation.eval_every 1000000 --video.enabled false --env_interaction.warmup_steps 1000 --progress_bar.log_every_env_steps 50"
run() { local name=$1 t=$2; shift 2; say "$name (at most $(cap "$t") s)"
        timeout -k 10 "$(cap "$t")" "$@" --trainer.logger.init_args.run_name "$name" > "$R/$name.log" 2>&1
        echo "rc=$?" | tee -a "$LOG"; grep -iE "warn|error|could not|Traceback" "$R/$name.log" | grep -viE "deprecat|num_workers" | head -5 >> "$LOG"; }
# the CUDA defaults first (compiled + graph + TF32): the figure the issue's goal is about
run both 150 $F $P $O --env_interaction.total_env_steps 1500 --env_interaction.log_every_env_steps 100
run graph 110 $F $P $O --env_interaction.total_env_steps 1300 --env_interaction.log_every_env_steps 50 --model.compile false
run both_fp32 110 $F $P $O --env_interaction.total_env_steps 1300 --env_interaction.log_every_env_steps 50 --model.tf32 false
run compiled 70 $F $P $O --env_interaction.total_env_steps 1050 --env_interaction.log_every_env_steps 25 --model.cuda_graph false
run eager 70 $F $P $O --env_interaction.total_env_steps 1050 --env_interaction.log_every_env_steps 25 --model.compile false --model.cuda_graph false
run sac 40 $F --config conf/algo/sac.yaml $O --env_interaction.total_env_steps 6000 --env_interaction.log_every_env_steps 1000
say "env steps per hour"
python3 - "$URI" <<'PY' 2>&1 | tee -a "$LOG"
import sys, mlflow
client = mlflow.MlflowClient(sys.argv[1])
for experiment in client.search_experiments():
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"]):
        p = run.data.params
        skip = int(p.get("env_interaction.warmup_steps", 0)) + int(p.get("env_interaction.log_every_env_steps", 0))
        rates = [m.value for m in client.get_metric_history(run.info.run_id, "time/env_steps_per_second") if m.step > skip]
        phases = {k: round(v * 1e3, 2) for k, v in run.data.metrics.items() if k.startswith("time/") and k.endswith("_seconds")}
        rate = f"{3600 * sum(rates) / len(rates):,.0f}" if rates else "-"
        print(f"{run.info.run_name:10} {run.info.status:9} windows {len(rates):3}  env steps/h {rate:>10}  last ms {phases}")
PY
say "make bench, kernels per update (paper shapes, SAC)"
timeout -k 5 "$(cap 150)" python3 -m mpdp_lightning.benchmarks.update --configs mpdp-paper,sac --repeats 5 --fit-rows 10000,200000 --fit-steps 10 --out "$R/bench20.json" > "$R/bench20.txt" 2>&1
echo "rc=$?" | tee -a "$LOG"; grep -E "^\| (update|improvement)|^- |reference" "$R/bench20.txt" >> "$LOG"
say done
