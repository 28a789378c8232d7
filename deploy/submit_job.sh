#!/usr/bin/env bash
# Submit a training run to an existing Ray cluster with the Ray Jobs API.
#   deploy/submit_job.sh http://127.0.0.1:8265 configs/quickstart.yaml model.path=/models/x
# Token auth: the client reads RAY_AUTH_TOKEN or ~/.ray/auth_token (copied from the head).
set -euo pipefail
address=$1; config=$2; shift 2
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
ray job submit --address "$address" --working-dir . -- \
  rlhf-cluster run "$config" --address auto "$@"
