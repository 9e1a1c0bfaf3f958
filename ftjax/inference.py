"""Run an exported ftjax model on raw inputs (texts, or image files / bytes), in Python.

  from ftjax.inference import Predictor
  Predictor("W")(["a fine film"])  ->  [("pos", 0.93)]

Defines no flags, so it imports beside any CLI module (ftjax.predict is its CLI).
"""

from __future__ import annotations

from typing import Sequence


class Predictor:
    """Runs an exported model on raw texts, or on image files / encoded image bytes."""

    def __init__(self, path: str):
        import jax

        from ftjax import checkpoint as ckpt_lib
        from ftjax import models
        from ftjax.models.layers import Peft

        params, meta = ckpt_lib.load_export(path)
        self.meta = meta
        self.labels = list(meta["label_names"])
        self.is_image = models.modality(meta["family"]) == "image"
        variables = {"params": params, **ckpt_lib.load_export_model_state(path)}
        # Merged methods export plain models; adapters, prompts and prefixes keep theirs.
        model = models.create_classifier(
            meta["family"], meta["hf_config"], num_labels=meta["num_labels"], pooling=meta["pooling"],
            dropout=None, head_dropout=None, dtype="float32", peft=Peft(**meta.get("peft", {})),
            image_size=meta.get("image_size"))
        self.params = params
        self.variables = variables
        if self.is_image:
            from ftjax.data import images

            self.preprocess = images.ImagePreprocess(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()})
            self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
        else:
            from etils import epath

            from ftjax.data import tokenizer as tok_lib

            export_dir = epath.Path(path)
            if (export_dir / "export").exists():
                export_dir = export_dir / "export"
            self.tokenizer = tok_lib.load_tokenizer(export_dir / "tokenizer")
            self._apply = jax.jit(lambda v, i, m, t: model.apply(v, i, m, t, train=False))

    def _logits(self, inputs: Sequence, pairs: Sequence[str] | None):
        import numpy as np

        from ftjax.errors import UserError

        if self.is_image:
            batch = []
            for item in inputs:
                data = item
                if isinstance(item, str):
                    try:
                        with open(item, "rb") as f:
                            data = f.read()
                    except OSError as e:
                        raise UserError(f"cannot read image {item}: {e.strerror}") from None
                try:
                    batch.append(self.preprocess.eval_image(data))
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                    raise UserError(f"{item if isinstance(item, str) else 'an input'} is not a readable "
                                    f"image ({type(e).__name__})") from None
            return np.asarray(self._apply(self.variables, np.stack(batch)), np.float32)
        encoded = self.tokenizer.encode(list(inputs), list(pairs) if pairs else None, self.meta["max_length"])
        length = max(len(ids) for ids, _ in encoded)
        length = 1 << max(length - 1, 1).bit_length()  # few distinct shapes, few compiles
        ids = np.full((len(encoded), length), self.tokenizer.pad_id, np.int32)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for i, (tok, typ) in enumerate(encoded):
            ids[i, :len(tok)], types[i, :len(tok)], mask[i, :len(tok)] = tok, typ, 1
        return np.asarray(self._apply(self.variables, ids, mask, types), np.float32)

    def __call__(self, inputs: Sequence, pairs: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """Returns (label, probability) per input; for regression ("", value).

        Args:
          inputs: texts (text models), or image file paths / encoded bytes (image models).
          pairs: second texts of sentence-pair models.
        """
        import jax
        import numpy as np

        logits = self._logits(inputs, pairs)
        if self.meta["num_labels"] == 1:
            return [("", float(v)) for v in logits[:, 0]]
        probs = np.asarray(jax.nn.softmax(logits, -1))
        return [(self.labels[k] if k < len(self.labels) else str(k), float(p[k]))
                for k, p in zip(probs.argmax(-1), probs)]
