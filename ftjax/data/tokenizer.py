"""Text tokenization with the HF fast tokenizer of a model folder.

Folders are read as HF ships them: tokenizer.json, a WordPiece vocab.txt (BERT), or a
SentencePiece spm.model (DeBERTa-v2/v3, which ship no tokenizer.json); the last two are
converted into the same fast `tokenizers` backend by transformers. A folder holding a
GGUF file and no tokenizer.json gets the tokenizer of the GGUF's metadata (built once,
then cached; see ftjax.convert.gguf.materialize).

The tokenizer's own padding is always disabled: pretrained tokenizer.json files often
pad every input to a fixed length (all-MiniLM-L6-v2 pads to 128), while the input
pipeline pads each batch dynamically to a bucket length. Truncation is done by the
tokenizer itself (`enable_truncation`), which keeps [CLS]/[SEP] in place and trims
sentence pairs longest-first.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from ftjax.errors import UserError

# The files that make a folder loadable, in the order they are tried.
_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "vocab.txt", "spm.model")


class TextTokenizer:
    """Batch encoder over a `tokenizers.Tokenizer` with padding off.

    Picklable (grain worker processes receive a copy) and safe to call from several
    threads as long as they use the same `max_length`.
    """

    def __init__(self, backend, source: str):
        """Wraps `backend`, a `tokenizers.Tokenizer`; `source` names it in errors."""
        # The tokenizer's own padding setting names its pad id (all-mpnet-base-v2 has both
        # "<pad>" = 1, the one it pads with, and a "[PAD]" = 4); read it before turning padding off.
        pad = backend.padding["pad_id"] if backend.padding else None
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._source = source
        self._max_length: int | None = None
        self._lock = threading.Lock()
        for token in ("[PAD]", "<pad>"):
            if pad is None:
                pad = backend.token_to_id(token)
        self.pad_id: int = 0 if pad is None else int(pad)
        self.vocab_size: int = int(backend.get_vocab_size(with_added_tokens=True))

    def __getstate__(self):
        return {"json": self._backend.to_str(), "source": self._source, "pad_id": self.pad_id}

    def __setstate__(self, state):
        import tokenizers

        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["source"])
        self.pad_id = state.get("pad_id", self.pad_id)  # the padding setting is gone from the json

    def _set_max_length(self, max_length: int) -> None:
        if max_length == self._max_length:
            return
        with self._lock:
            if max_length != self._max_length:
                try:
                    self._backend.enable_truncation(max_length=max_length, strategy="longest_first")
                except Exception as e:  # the Rust side raises plain Exception subclasses
                    raise UserError(f"max_length={max_length} is not usable with the tokenizer "
                                    f"from {self._source}: {e}") from None
                self._max_length = max_length

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int
               ) -> list[tuple[list[int], list[int]]]:
        """Tokenizes a batch, truncating each input (or pair) to `max_length` tokens.

        Args:
          texts: the first segments.
          pairs: the second segments (same length as `texts`), or None.
          max_length: the most tokens per input, [CLS] and [SEP]s included.

        Returns:
          One `(ids, type_ids)` pair of int lists per input, unpadded.
        """
        if max_length < 3:
            raise UserError(f"max_length must be at least 3 (room for [CLS] x [SEP]), got {max_length}")
        self._set_max_length(max_length)
        if pairs is None:
            encodings = self._backend.encode_batch(list(texts))
        else:
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
            encodings = self._backend.encode_batch(list(zip(texts, pairs)))
        return [(e.ids, e.type_ids) for e in encodings]


    def content_ids(self, text: str) -> list[int]:
        """The ids of `text` alone: no [CLS]/[SEP], BOS or other special tokens (cut at the
        truncation length of the last `encode`, if any)."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)


def tokenizer_folder(config):
    """The folder of the run's tokenizer files: `config.model.tokenizer` (a folder or
    asset:NAME), else the pretrained model's folder (an epath.Path)."""
    from etils import epath

    from ftjax import assets

    if not (config.model.tokenizer or config.model.pretrained):
        raise UserError("set config.model.tokenizer (a folder with tokenizer files) or config.model.pretrained")
    name = config.model.tokenizer
    if name:
        return epath.Path(assets.fetch(name[len("asset:"):]) if name.startswith("asset:") else name)
    return epath.Path(assets.resolve_model_dir(config.model.pretrained))


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """Loads the fast tokenizer of a model folder (an HF snapshot or an export).

    `tokenizer.json` is used when present. Otherwise the folder goes through
    `transformers` (`AutoTokenizer` when a tokenizer_config.json or config.json says
    which class, else `BertTokenizer` for a bare vocab.txt and `DebertaV2Tokenizer` for a
    bare spm.model) and its fast backend is kept. Converting a SentencePiece model needs
    the `sentencepiece` package (and `protobuf`).

    Args:
      folder: a local folder holding tokenizer.json, or vocab.txt or spm.model (+ configs).

    Returns:
      A TextTokenizer with padding disabled.

    Raises:
      UserError: the folder or its tokenizer files are missing or unreadable.
    """
    path = os.fspath(folder)
    if not os.path.isdir(path):
        raise UserError(f"tokenizer folder {path} does not exist; set config.model.tokenizer "
                        "or config.model.pretrained to a model folder")
    present = [f for f in _FILES if os.path.exists(os.path.join(path, f))]
    try:
        if "tokenizer.json" in present:
            import tokenizers

            backend = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        elif any(name.endswith(".gguf") for name in os.listdir(path)):
            import tokenizers

            from ftjax.convert import gguf

            cached = gguf.materialize(gguf.find_gguf(path))
            backend = tokenizers.Tokenizer.from_file(os.fspath(cached / "tokenizer.json"))
        elif "vocab.txt" in present:
            import transformers

            # BertTokenizer(vocab_file=...) silently ignores the file in transformers 5;
            # from_pretrained(folder) reads it.
            if "tokenizer_config.json" in present or "config.json" in present:
                hf = transformers.AutoTokenizer.from_pretrained(path)
            else:
                hf = transformers.BertTokenizer.from_pretrained(path)
            backend = hf.backend_tokenizer
        elif "spm.model" in present:
            backend = _sentencepiece_backend(path, present)
        else:
            raise UserError(f"no tokenizer in {path}: expected tokenizer.json or vocab.txt "
                            "(or a SentencePiece spm.model)")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {path}: {' '.join(str(e).split())}") from None
    return TextTokenizer(backend, path)


def _sentencepiece_backend(path: str, present: list[str]):
    """The fast backend of a DeBERTa-style folder: spm.model (+ tokenizer_config.json / config.json)."""
    missing = [package for module, package in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))
               if not _importable(module)]
    if missing:
        # transformers would fall back to a TikToken reader and fail with an unrelated message
        raise UserError(f"{path} has a SentencePiece tokenizer (spm.model) and no tokenizer.json; converting it "
                        f"needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    import transformers

    if "config.json" in present or _names_class(os.path.join(path, "tokenizer_config.json")):
        hf = transformers.AutoTokenizer.from_pretrained(path)
    else:
        # microsoft/deberta-v3-* tokenizer_config.json names no class; spm.model is DeBERTa's file name
        hf = transformers.DebertaV2Tokenizer.from_pretrained(path)
    return hf.backend_tokenizer


def _names_class(config_path: str) -> bool:
    """Whether a tokenizer_config.json says which tokenizer class it is for."""
    import json

    try:
        with open(config_path, encoding="utf-8") as f:
            return bool(json.load(f).get("tokenizer_class"))
    except (OSError, ValueError, AttributeError):
        return False


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False
