"""Run a fine-tuned model on texts or images.

  python -m ftjax.predict --workdir=W "text" ...       # a text model
  python -m ftjax.predict --workdir=W photo.jpg ...    # an image model: image files
  python -m ftjax.predict --workdir=W clip.wav ...     # a speech model: audio files (the transcript)
  python -m ftjax.predict --workdir=W "article ..."    # a decoder LM (causal_lm): the generated text;
      --beams=4 (beam search), --temperature=0.8 --top_p=0.9 --seed=1 (sampling), --max_new_tokens=N

Loads the params-only export (W/export) with its tokenizer or image preprocessing and
prints one line per input, as its task renders it: the label and its probability
(classification), the value (regression), or the task's own rendering.
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
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Generation: the most new tokens (default: the run's).")
_BEAMS = flags.DEFINE_integer("beams", None, "Generation: beam search with this many beams (1: greedy).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Generation: > 0 samples at this temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "Generation: sample from the top-p nucleus (with --temperature).")
_SEED = flags.DEFINE_integer("seed", None, "Generation: the sampling seed.")

from ftjax.inference import Predictor  # noqa: E402


def main(argv):
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    texts = argv[1:]
    if not texts:
        raise app.UsageError('give one or more texts (or image / audio files): python -m ftjax.predict --workdir=W "text" ...')
    with cli.user_errors():
        generation = {k: f.value for k, f in (("max_new_tokens", _MAX_NEW), ("beams", _BEAMS),
                                              ("temperature", _TEMPERATURE), ("top_p", _TOP_P), ("seed", _SEED))
                      if f.value is not None}
        predictor = Predictor(_WORKDIR.value, generation=generation)
        for start in range(0, len(texts), _BATCH.value):
            chunk = texts[start:start + _BATCH.value]
            pairs = [_PAIR.value] * len(chunk) if _PAIR.value else None
            for text, out in zip(chunk, predictor(chunk, pairs)):
                print(f"{render(out)}\t{text}")


def render(out) -> str:
    """One prediction as text: "label<TAB>probability", a regression value, or str(out)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], float):
        label, value = out
        return f"{label}\t{value:.4f}" if label else f"{value:.6g}"
    return str(out)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
