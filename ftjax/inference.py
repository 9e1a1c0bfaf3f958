"""Run an exported ftjax model on raw inputs (texts, image or audio files / bytes), in Python.

  from ftjax.inference import Predictor
  Predictor("W")(["a fine film"])  ->  [("pos", 0.93)]

The export's meta.json names the family (how inputs are read: its modality) and the
task (which model to build and how a prediction reads: `Task.render`). Defines no
flags, so it imports beside any CLI module (ftjax.predict is its CLI).
"""

from __future__ import annotations

from typing import Sequence


class Predictor:
    """Runs an exported model on raw texts, image files / encoded image bytes, or audio files."""

    def __init__(self, path: str, generation: dict | None = None):
        """Loads the export of `path` (a workdir or its export/ folder); `generation`
        overrides its generation settings (max_new_tokens, beams, temperature, top_p, seed)."""
        import jax

        from ftjax import checkpoint as ckpt_lib
        from ftjax import models, tasks
        from ftjax.models.layers import Peft

        from etils import epath

        params, meta = ckpt_lib.load_export(path)
        export_dir = epath.Path(path)
        if (export_dir / "export").exists():
            export_dir = export_dir / "export"
        self.meta = meta = {**meta, "export_dir": str(export_dir)}
        if generation:
            meta["generation"] = {**meta.get("generation", {}), **generation}
        self.family = models.family(meta["family"])
        self.task = tasks.from_meta(meta)
        self.variables = {"params": params, **ckpt_lib.load_export_model_state(path)}
        # Merged methods export plain models; adapters, prompts and prefixes keep theirs.
        options = models.EncoderOptions(peft=Peft(**meta.get("peft", {})), image_size=meta.get("image_size"))
        model = self.task.build_model(meta["family"], meta["model_config"], options)
        self._predict = jax.jit(lambda v, batch: self.task.infer(model, v, batch))
        self._keys = self.task.infer_keys or self.task.predict_keys or model.input_keys
        if self.family.modality == "image":
            from ftjax.data import images

            self.preprocess = images.ImagePreprocess(**{
                k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocess"].items()})
        elif self.family.modality == "text" and "causal_lm" not in self.family.provides:
            from ftjax.data import tokenizer as tok_lib

            self.tokenizer = tok_lib.load_tokenizer(export_dir / "tokenizer")

    def _images(self, inputs: Sequence) -> dict:
        import numpy as np

        from ftjax.errors import UserError

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
            except UserError as e:
                raise UserError(f"{item if isinstance(item, str) else 'an input'}: {e}") from None
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                raise UserError(f"{item if isinstance(item, str) else 'an input'} is not a readable "
                                f"image ({type(e).__name__})") from None
        return {"image": np.stack(batch)}

    def _audio(self, inputs: Sequence) -> dict:
        import numpy as np

        from ftjax.data import audio

        seconds = float(self.meta.get("max_audio_seconds", 30.0))
        n_mels = int(self.meta.get("n_mels", 80))
        features = [audio.log_mel(audio.read_audio(item, max_seconds=seconds), n_mels=n_mels, seconds=seconds)
                    for item in inputs]
        return {"input_features": np.stack(features)}

    def _texts(self, inputs: Sequence[str], pairs: Sequence[str] | None) -> dict:
        from ftjax.data.pipeline import pad_encoded

        encoded = self.tokenizer.encode(list(inputs), list(pairs) if pairs else None, self.meta["max_length"])
        length = max(len(ids) for ids, _ in encoded)
        length = 1 << max(length - 1, 1).bit_length()  # few distinct shapes, few compiles
        return pad_encoded(encoded, length, self.tokenizer.pad_id)

    def __call__(self, inputs: Sequence, pairs: Sequence[str] | None = None) -> list:
        """Returns the task's rendering per input: (label, probability) for classification,
        ("", value) for regression.

        Args:
          inputs: texts (text models), or image file paths / encoded bytes (image models).
          pairs: second texts of sentence-pair models.
        """
        import jax

        batch = self.task.raw_batch(list(inputs))
        if batch is not None:
            pass
        elif self.family.modality == "image":
            batch = self._images(inputs)
        elif self.family.modality == "audio":
            batch = self._audio(inputs)
        else:
            batch = self._texts(inputs, pairs)
        out = self._predict(self.variables, {k: batch[k] for k in self._keys})
        return self.task.render(jax.device_get(out))
