#!/usr/bin/env bash
# Side venv for the HF Flax peer of benchmarks/peers.py (transformers 4.57, the last release
# with Flax model classes). Never part of ftjax's install or test suite.
#
#   bash benchmarks/peers_env.sh [VENV_DIR]       # default /work/venv-flax
#
# jax/flax/optax are pinned to what the main venv has, so both JAX peers run the same XLA.
# The HF PyTorch peer uses any python with torch 2.x + transformers (the reference venv);
# pass it to peers.py with --torch_python=...
set -euo pipefail
VENV=${1:-/work/venv-flax}
MAIN_PY=${MAIN_PY:-/work/venv/bin/python}
ver() { "$MAIN_PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
JAX=$(ver jax); FLAX=$(ver flax); OPTAX=$(ver optax); NUMPY=$(ver numpy)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# No torch: the Flax peer loads the safetensors/flax weights without it.
"$VENV/bin/pip" install -q "transformers==4.57.*" "jax==$JAX" "jaxlib==$JAX" "flax==$FLAX" \
    "optax==$OPTAX" "numpy==$NUMPY" safetensors
# The image peers (--model=vit_s16|resnet50) use the Flax ViT and ResNet classes of the same release.
"$VENV/bin/python" -c "from transformers import FlaxBertForSequenceClassification, FlaxViTForImageClassification, \
FlaxResNetForImageClassification; import jax, transformers; \
print('ok: transformers', transformers.__version__, 'jax', jax.__version__)"
