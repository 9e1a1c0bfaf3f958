"""Classify texts or images with a fine-tuned model.

  python -m ftjax.predict --workdir=W "text" ...       # a text model
  python -m ftjax.predict --workdir=W photo.jpg ...    # an image model: image files

Loads the params-only export (W/export) with its tokenizer or image preprocessing and
label names, and prints one line per input: the label and its probability (or the
value, for regression).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from ftjax import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (or its export/ folder).")
_PAIR = flags.DEFINE_string("pair", None, "Second text for sentence-pair models (applies to all inputs).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Inputs per forward pass.")

from ftjax.inference import Predictor  # noqa: E402


def main(argv):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    texts = argv[1:]
    if not texts:
        raise app.UsageError('give one or more texts (or image files): python -m ftjax.predict --workdir=W "text" ...')
    with cli.user_errors():
        predictor = Predictor(_WORKDIR.value)
        for start in range(0, len(texts), _BATCH.value):
            chunk = texts[start:start + _BATCH.value]
            pairs = [_PAIR.value] * len(chunk) if _PAIR.value else None
            for text, (label, p) in zip(chunk, predictor(chunk, pairs)):
                print(f"{label}\t{p:.4f}\t{text}" if label else f"{p:.6g}\t{text}")


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
