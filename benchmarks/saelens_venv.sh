#!/usr/bin/env bash
# Build the separate virtual environment with SAELens that tests/test_interop.py runs to prove scope <-> SAELens
# interop (tests/saelens_side.py runs inside it). It is separate because sae-lens 6.x needs transformer-lens < 4
# and scope needs >= 4. Usage: benchmarks/saelens_venv.sh [VENV_DIR]   (default /work/saelens-venv; the tests
# look there, or at $SCOPE_SAELENS_PYTHON). Took ~3 min on 2 CPU cores.
set -euo pipefail
VENV="${1:-/work/saelens-venv}"
SAE_LENS="${SAE_LENS_SPEC:-sae-lens==6.54.12}"  # the version the interop tests were written against
"${PYTHON:-python3}" -m venv "$VENV"
# torch first and pinned: pip then keeps the CPU wheel it has instead of pulling a multi-GB CUDA build for sae-lens
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "$SAE_LENS"
"$VENV/bin/python" -c "import sae_lens, torch; print('sae-lens', sae_lens.__version__, 'torch', torch.__version__)"
echo "ready: SCOPE_SAELENS_PYTHON=$VENV/bin/python pytest tests/test_interop.py"
