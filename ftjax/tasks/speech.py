"""Speech recognition: an audio encoder-decoder (Whisper) trained on transcripts, scored by WER.

The decoder is taught with teacher forcing on

    <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|> " text" <|endoftext|>

(English-only checkpoints such as tiny.en have no language and task tokens); the
loss counts the text tokens and the end token, never the prompt. Evaluation decodes
on device (`ftjax.decoding`: greedy, or beam search with `generation.beams` > 1)
from the same prompt, with Whisper's token constraints (no timestamps or other
special tokens; no lone space or end first), and scores word and character error
rates (`jiwer`) on normalised text: case folded, punctuation removed, spaces
collapsed. `wer` is the dev metric (config.metric="wer", metric_mode="min").
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ftjax import decoding, tasks
from ftjax.errors import UserError
from ftjax.tasks import Task

SOT, EOT, NO_TIMESTAMPS, TRANSCRIBE = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>", "<|transcribe|>"


def normalize(text: str) -> str:
    """Lower case, punctuation (apostrophes too) removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text.replace("'", ""))
    return re.sub(r"\s+", " ", text).strip()


class WhisperText:
    """Whisper's byte-level BPE (tokenizer.json) with the prompt and constraint ids.

    Args:
      folder: a folder holding tokenizer.json.
      vocab_size: the model's vocabulary (51864 for the English-only checkpoints).
      language: language code of multilingual checkpoints ("en"); None for English-only.
      suppress_tokens: extra token ids never produced (config.json "suppress_tokens").
    """

    def __init__(self, folder, vocab_size: int, language: str | None = None, suppress_tokens=()):
        import os

        import tokenizers

        path = os.path.join(os.fspath(folder), "tokenizer.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception types
            raise UserError(f"cannot read the Whisper tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = int(vocab_size)
        self.eot = self._id(EOT)
        self.language = language
        names = [SOT] + ([f"<|{language}|>", TRANSCRIBE] if language else []) + [NO_TIMESTAMPS]
        self.prompt = [self._id(n) for n in names]
        self.suppress = sorted({int(t) for t in suppress_tokens if 0 <= int(t) < self.vocab_size})

    def _id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise UserError(f"the Whisper tokenizer has no {token} token")
        return int(i)

    def __call__(self, text: str) -> tuple[list[int], int]:
        """(prompt + tokens of " text" + EOT, the first position the loss counts)."""
        ids = self._tok.encode(" " + text.strip(), add_special_tokens=False).ids
        return self.prompt + ids + [self.eot], len(self.prompt)

    def decode(self, ids) -> str:
        """The text of generated ids, up to the first EOT (special tokens dropped)."""
        ids = [int(i) for i in ids]
        if self.eot in ids:
            ids = ids[:ids.index(self.eot)]
        return self._tok.decode([i for i in ids if i < self.eot], skip_special_tokens=True).strip()

    def never(self) -> list[int]:
        """Ids never produced while transcribing: every special token after EOT, and `suppress`."""
        return list(range(self.eot + 1, self.vocab_size)) + self.suppress

    def meta(self) -> dict[str, Any]:
        return {"language": self.language, "suppress_tokens": self.suppress, "vocab_size": self.vocab_size,
                "prompt": self.prompt, "eot": self.eot}


class SpeechSeq2SeqModel(nn.Module):
    """The family's audio encoder-decoder under its name; `call` picks the method.

    `model.apply(v, input_features, decoder_input_ids, train=...)` gives teacher-forced
    logits; `call="encode" | "init_cache" | "decode_step"` reaches the decoding methods.
    """

    family: str
    encoder_config: Any
    options: Any
    input_keys: ClassVar[tuple[str, ...]] = ("input_features", "decoder_input_ids")

    def dummy_inputs(self):
        cfg = self.encoder_config
        return [jnp.zeros((1, cfg.num_mel_bins, 2 * cfg.max_source_positions), jnp.float32),
                jnp.zeros((1, 4), jnp.int32)]

    @nn.compact
    def __call__(self, *args, train: bool = False, call: str = "__call__"):
        from ftjax import models

        spec = models.family(self.family)
        inner = spec.encoder(self.encoder_config, self.options, spec.name)
        if call == "__call__":
            return inner(*args, train=train)
        return getattr(inner, call)(*args)


class SpeechMetrics:
    """wer, cer (corpus level, jiwer) and num_examples over normalised transcripts."""

    def __init__(self, text: WhisperText):
        self.text = text
        self.refs: list[str] = []
        self.hyps: list[str] = []

    def update(self, predictions: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
        labels, label_mask = np.asarray(rows["labels"]), np.asarray(rows["label_mask"]) > 0
        for pred, ref, m, real in zip(np.asarray(predictions["tokens"]), labels, label_mask,
                                      np.asarray(rows["mask"]) > 0):
            if real:
                self.refs.append(normalize(self.text.decode(ref[m])))
                self.hyps.append(normalize(self.text.decode(pred)))

    def result(self) -> dict[str, float]:
        import jiwer

        if not self.refs:
            raise UserError("the evaluation split has no examples")
        keep = [i for i, r in enumerate(self.refs) if r]
        if not keep:
            raise UserError("every reference transcript of the evaluation split is empty after normalisation")
        refs, hyps = [self.refs[i] for i in keep], [self.hyps[i] for i in keep]
        return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps)),
                "num_examples": len(self.refs)}


class SpeechRecognition(Task):
    """Audio in, transcript out."""

    name = "speech_recognition"
    eval_keys = ("labels", "label_mask")
    predict_keys = ("input_features",)

    def __init__(self, text: WhisperText, generation: dict[str, Any], data_meta: dict[str, Any]):
        self.text = text
        self.generation = dict(generation)
        self.data_meta = dict(data_meta)

    @staticmethod
    def _text(model_config: dict, folder, language) -> WhisperText:
        return WhisperText(folder, model_config.get("vocab_size", 51865), language,
                           model_config.get("suppress_tokens") or ())

    @classmethod
    def load_data(cls, config, family, process_index, process_count):
        from ftjax import train
        from ftjax.data import speech, tokenizer as tok_lib

        if family.modality != "audio":
            raise UserError(f"task speech_recognition needs an audio model; the {family.name} family takes "
                            f"{family.modality}")
        tok_dir = tok_lib.tokenizer_folder(config)
        model_config = train.resolve_model(config)[2]  # the pretrained folder's config, or the variant's
        text = cls._text(model_config, tok_dir, config.generation.language)
        data = speech.SpeechData(config, text, process_index, process_count)
        data.tokenizer_dir, data.text = tok_dir, text
        return data

    @classmethod
    def from_config(cls, config, data):
        g = config.generation
        generation = {"beams": int(g.beams), "max_new_tokens": int(g.max_new_tokens),
                      "length_penalty": float(g.length_penalty)}
        if generation["beams"] < 1 or generation["max_new_tokens"] < 1:
            raise UserError(f"generation.beams={g.beams} and generation.max_new_tokens={g.max_new_tokens} "
                            "must be >= 1")
        return cls(data.text, generation, data.export_meta())

    @classmethod
    def from_meta(cls, meta):
        import os

        folder = os.path.join(meta["export_dir"], "tokenizer")
        text = WhisperText(folder, meta["text"]["vocab_size"], meta["text"]["language"],
                           meta["text"]["suppress_tokens"])
        return cls(text, meta["generation"], {k: meta[k] for k in ("max_audio_seconds", "n_mels") if k in meta})

    def build_model(self, family_name, model_config, options):
        from ftjax import models

        cfg = models.family(family_name).config(model_config)
        need = len(self.text.prompt) + self.generation["max_new_tokens"]
        if need > cfg.max_target_positions:
            raise UserError(f"the prompt ({len(self.text.prompt)}) + generation.max_new_tokens "
                            f"({self.generation['max_new_tokens']}) exceed the decoder's "
                            f"{cfg.max_target_positions} positions")
        return SpeechSeq2SeqModel(family_name, cfg, options)

    def loss(self, logits, batch):
        return tasks.masked_token_loss(logits, batch)

    def predict(self, model, variables, batch):
        """Transcribes on device: {"tokens": int32 [B, generation.max_new_tokens]}."""
        g, text = self.generation, self.text

        def run(call, *args):
            return model.apply(variables, *args, call=call)

        encoded = run("encode", batch["input_features"])
        b = encoded.shape[0]
        prompt = jnp.tile(jnp.asarray(text.prompt, jnp.int32), (b, 1))
        cache = run("init_cache", encoded, len(text.prompt) + g["max_new_tokens"])
        vocab = model.encoder_config.vocab_size
        kw = dict(max_new_tokens=g["max_new_tokens"], eos_id=text.eot,
                  suppress=decoding.token_mask(vocab, text.never()),
                  begin_suppress=decoding.token_mask(vocab, [text.eot, *self._space_ids()]))
        step = lambda tokens, c, index: run("decode_step", tokens, c, index)  # noqa: E731
        if g["beams"] > 1:
            tokens = decoding.beam_search(step, cache, prompt, beams=g["beams"],
                                          length_penalty=g["length_penalty"], **kw)
        else:
            tokens = decoding.greedy(step, cache, prompt, **kw)
        return {"tokens": tokens}

    def _space_ids(self) -> list[int]:
        space = self.text._tok.token_to_id("Ġ")  # a lone space, byte-level
        return [] if space is None else [int(space)]

    def evaluators(self):
        return [SpeechMetrics(self.text)]

    @classmethod
    def metric_names(cls):
        return ("wer", "cer", "num_examples")

    def export_meta(self):
        return {"task": self.name, "text": self.text.meta(), "generation": self.generation}

    @classmethod
    def hf_files(cls, meta):
        """generation_config.json (the prompt's token ids, the constraints) and
        preprocessor_config.json (WhisperFeatureExtractor's settings) for HF's pipeline."""
        text, cfg = meta["text"], meta["model_config"]
        sot, *_, no_timestamps = text["prompt"]
        generation = {
            "decoder_start_token_id": sot, "eos_token_id": text["eot"], "pad_token_id": text["eot"],
            "bos_token_id": text["eot"], "no_timestamps_token_id": no_timestamps,
            "suppress_tokens": text["suppress_tokens"], "begin_suppress_tokens": [220, text["eot"]],
            "max_length": cfg.get("max_target_positions", 448), "is_multilingual": bool(text["language"]),
            "num_beams": meta["generation"]["beams"], "length_penalty": meta["generation"]["length_penalty"]}
        n_mels = int(meta.get("n_mels", cfg.get("num_mel_bins", 80)))
        features = {  # HF pads every clip to 30 s; the run's window is meta["max_audio_seconds"]
            "feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
            "feature_size": n_mels, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
            "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
            "padding_value": 0.0, "return_attention_mask": False}
        return {"config.json": {"suppress_tokens": text["suppress_tokens"],
                                "begin_suppress_tokens": [220, text["eot"]]},
                "generation_config.json": generation, "preprocessor_config.json": features}

    def fingerprint(self):
        return {"task": self.name}

    def summary(self):
        return {"generation": self.generation, **self.data_meta}

    def render(self, predictions):
        return [self.text.decode(row) for row in np.asarray(predictions["tokens"])]


TASK = SpeechRecognition
