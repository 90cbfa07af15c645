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
FLWR="${FLWR:-.venv/bin/flwr}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = $NUM_SUPERNODES
options.backend.client-resources.num-cpus = $CPUS_PER_CLIENT
options.backend.client-resources.num-gpus = 0.0
TOML

stop_superlink() {
  local pid
  pid="$(pgrep -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true)"
  if [[ -n "$pid" ]]; then kill $pid; fi
}
trap stop_superlink EXIT
"$FLWR" run . local --stream -c "runs-dir=\"$PWD/runs\" min-available-nodes=$NUM_SUPERNODES" "$@"
