#!/usr/bin/env bash
# Run the app with `flwr run .` on a local simulation SuperLink (10 virtual clients by default).
#
#   simulations/flwr_local.sh                          # defaults from [tool.flwr.app.config]
#   simulations/flwr_local.sh -c "ipc=5 iterations=20" # run-config overrides
#   NUM_SUPERNODES=100 simulations/flwr_local.sh -c "fraction-evaluate=0.0"
#
# Flower keeps its state in $FLWR_HOME (here: ./.flwr, git-ignored); the connection "local"
# is written to $FLWR_HOME/config.toml, never to pyproject.toml. `flwr run` starts a detached
# SuperLink that would outlive the run: this script stops it (that one process, by PID).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
# Without this the SuperLink would `uv sync` the app's dependencies (GBs of other torch wheels).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
NUM_SUPERNODES="${NUM_SUPERNODES:-10}"
CPUS_PER_CLIENT="${CPUS_PER_CLIENT:-1}"
# `flwr run` spawns `flower-superlink` from PATH: use the project venv's.
if [[ -d .venv/bin ]]; then export PATH="$PWD/.venv/bin:$PATH"; fi
FLWR="${FLWR:-flwr}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
TOML

stop_superlink() {
  local pid
  pid="$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true)"
  if [[ -n "$pid" ]]; then kill $pid; fi
}
trap stop_superlink EXIT
# A FAB carries only text sources, so the nodes find the bundled sample through
# $FEDISTILL_MNIST10K (distill.data.bundled_path); the run store goes to ./runs (the apps run
# from a copy under $FLWR_HOME/apps).
export FEDISTILL_MNIST10K="${FEDISTILL_MNIST10K:-$PWD/distill/assets/mnist10k.npz}"
# A virtual node loads only a dataset it names (client/task.py dataset_refusal) and Flower gives it
# no node-config of its own: name the run's dataset (the last `-c dataset=...`, else the app's
# default, parsed as `flwr run` parses -c) in the environment the local SuperLink and its
# simulation inherit.
run_configs=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -c|--run-config) run_configs+=("${args[i + 1]:-}"); i=$((i + 1)) ;;
    --run-config=*) run_configs+=("${args[i]#--run-config=}") ;;
  esac
done
export FEDISTILL_NODE_DATASETS
FEDISTILL_NODE_DATASETS="$(python -c 'import sys
from simulations.deploy import run_config_dataset
print(run_config_dataset(sys.argv[1:]))' ${run_configs[@]+"${run_configs[@]}"})"
"$FLWR" run . local --stream \
  --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=$CPUS_PER_CLIENT" \
  -c "runs-dir=\"$PWD/runs\" min-available-nodes=$NUM_SUPERNODES" "$@"
