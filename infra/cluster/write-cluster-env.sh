#!/usr/bin/env bash
# Write the env file that infra/cluster/stamp-cluster.yaml ships to every node (file_mounts) and
# that the nodes export before `ray start`. Values come from THIS shell's environment; the file is
# created with mode 0600 outside the repository. Only variable names are printed, never values.
#
#   export STAMP_S3_ENDPOINT=https://s3.example.internal AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
#   export MLFLOW_TRACKING_URI=https://mlflow.example.internal STAMP_BUCKET=stamp
#   infra/cluster/write-cluster-env.sh [OUTPUT]       # default: ~/.stamp/cluster.env
set -euo pipefail

out="${1:-$HOME/.stamp/cluster.env}"
names=(
  STAMP_S3_ENDPOINT AWS_ENDPOINT_URL_S3 MLFLOW_S3_ENDPOINT_URL
  STAMP_BUCKET STAMP_PREFIX MLFLOW_TRACKING_URI
  AWS_DEFAULT_REGION AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN
  MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
)

# One endpoint for everybody: STAMP settings, boto3 and MLflow's S3 artifact client.
if [ -n "${STAMP_S3_ENDPOINT:-}" ]; then
  export AWS_ENDPOINT_URL_S3="${AWS_ENDPOINT_URL_S3:-$STAMP_S3_ENDPOINT}"
  export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL:-$STAMP_S3_ENDPOINT}"
fi
if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
  echo "warning: MLFLOW_TRACKING_URI is not set: jobs on the cluster would log to a node-local sqlite file" >&2
fi

umask 077
mkdir -p "$(dirname "$out")"
tmp="$(mktemp "$out.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
written=()
for name in "${names[@]}"; do
  if [ -n "${!name:-}" ]; then
    printf '%s=%q\n' "$name" "${!name}" >> "$tmp"
    written+=("$name")
  fi
done
chmod 600 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out (mode 600): ${written[*]:-nothing (no variable set)}"
