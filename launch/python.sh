# Sourced by the launch scripts: the Python interpreter the package is installed in, as $python.
# Order: --python PATH (the script's first arguments), $PYTHON, the active virtual environment's
# python, python3 on PATH. It must import jax and distillm2_jax, or the script stops here
# with a message saying how to choose another (rather than N processes failing on import).
if [ "${1:-}" = "--python" ]; then
  if [ $# -lt 2 ]; then echo "error: --python needs a path" >&2; exit 2; fi
  PYTHON=$2; shift 2
fi
python=${PYTHON:-}
if [ -z "$python" ] && [ -n "${VIRTUAL_ENV:-}" ]; then python=$VIRTUAL_ENV/bin/python; fi
if [ -z "$python" ]; then python=$(command -v python3 || command -v python || true); fi
if [ -z "$python" ] || ! "$python" -c "import jax, distillm2_jax" 2>/dev/null; then
  echo "error: ${python:-no python3 on PATH} cannot import distillm2_jax; run the interpreter it is installed in: PYTHON=/path/to/venv/bin/python $0 ... (or $0 --python PATH ...)" >&2
  exit 2
fi
