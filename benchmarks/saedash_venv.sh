#!/usr/bin/env bash
# Build the separate virtual environment with sae-dashboard that benchmarks/dashboard.py runs as the peer
# (benchmarks/saedash_side.py runs inside it). It is separate because sae-dashboard needs sae-lens and
# transformer-lens < 4, and scope needs >= 4. Usage: benchmarks/saedash_venv.sh [VENV_DIR]
# (default /work/saedash-venv; the benchmark looks there, or at $SCOPE_SAEDASH_PYTHON). ~4 min on 2 CPU cores.
set -euo pipefail
VENV="${1:-/work/saedash-venv}"
SAE_DASHBOARD="${SAE_DASHBOARD_SPEC:-sae-dashboard==0.8.0}"  # the version the benchmark was written against
"${PYTHON:-python3}" -m venv "$VENV"
PIN="$(mktemp)"
echo "torch==2.13.0" > "$PIN"
# torch pinned for every step: pip then keeps the CPU wheel instead of pulling a multi-GB CUDA build
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -c "$PIN" "$SAE_DASHBOARD"
# sae-dashboard's resolve leaves numpy 1.26 (transformer-lens 2.x) beside a pyarrow built for numpy 2, and
# torchvision/torchaudio builds for another torch; neither is used here, both break imports.
"$VENV/bin/pip" install -q -c "$PIN" "pyarrow<18"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio || true
rm -f "$PIN"
"$VENV/bin/python" -c "import sae_dashboard, sae_lens, transformer_lens, torch; print('sae-lens', sae_lens.__version__, 'torch', torch.__version__)"
echo "ready: python benchmarks/dashboard.py --store STORE --sae SAE"
