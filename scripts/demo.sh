#!/usr/bin/env bash
# Set up, then run the demo on the embedded default (in-process engine, embedded Qdrant, SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
KVCLUSTER_SKIP_REDIS=1 bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec kvcluster demo "$@"
