"""Every config key, declared once with its type and default.

Experiment configs start from `base_config()` and only assign keys that exist here.
The returned ConfigDict is locked: a misspelled key or a value of the wrong type is
an error, and library code reads keys directly (never `config.get(key, default)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


def base_config() -> ml_collections.ConfigDict:
    """Returns the unlocked base config holding every key ftjax reads."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- model --------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    # An HF snapshot folder, a hub name (e.g. "bert-base-uncased"), or "asset:NAME"
    # for a pinned offline asset (see ftjax/assets.py). None: no pretrained weights.
    c.model.pretrained = placeholder(str)
    # bert, vit, resnet or efficientnet (ftjax.models.FAMILIES), or a module path exporting
    # FAMILY. None: the family whose model types include the pretrained config.json's
    # "model_type" (a model from scratch, model.variant, needs it set).
    c.model.family = placeholder(str)
    c.model.variant = placeholder(str)  # e.g. "tiny"; used when pretrained is None
    c.model.tokenizer = placeholder(str)  # tokenizer folder or asset:NAME; None: the pretrained folder
    c.model.pooling = "pooler"          # "pooler" (BERT [CLS] + dense tanh), "cls" or "mean"
    c.model.dropout = placeholder(float)  # None: the pretrained config's hidden dropout
    # Dropout before the head. None: text encoders, their hidden dropout (model.dropout,
    # else the pretrained config's); EfficientNet, its reference classifier dropout
    # (the config's dropout_rate); other image encoders, 0.
    c.model.head_dropout = placeholder(float)
    c.model.dtype = "float32"           # compute dtype: "float32" or "bfloat16" (params stay fp32)
    c.model.dont_load = ("head/.*",)    # regexes of params not taken from pretrained weights
    # BatchNorm encoders (resnet, efficientnet): False uses and keeps the pretrained
    # statistics (right for small batches); True trains with batch statistics and updates them.
    c.model.update_batch_stats = False
    # BatchNorm running-average momentum (flax convention: new = m * old + (1 - m) * batch).
    # None: the family's (EfficientNet 0.99, TF's; ResNet 0.9, torch's 0.1). Short runs from
    # scratch want 0.9 or lower: at 0.99, 100 steps leave 37% of each average at its init.
    c.model.bn_momentum = placeholder(float)
    c.init_from = placeholder(str)      # a workdir or export dir of a previous ftjax run

    # ---- fine-tuning method (ftjax/methods/) ----------------------------------
    # full, linear_probe, freeze, gradual_unfreezing, bitfit, layernorm, lora, ia3, adapter,
    # prompt, prefix
    c.method = "full"
    # What is predicted and how it is scored: a module of ftjax/tasks/ ("classification",
    # "regression") or a dotted module path of your own task; None: regression when the
    # data's labels are numbers (data.regression or a float label feature), else classification.
    c.task = placeholder(str)
    c.method_args = ml_collections.ConfigDict()
    c.method_args.freeze = ()               # freeze: regexes of params to freeze
    c.method_args.freeze_bottom_k = 0       # freeze: embeddings + the bottom k layers
    c.method_args.layerwise_lr_decay = 1.0  # any method: lr x decay^(depth from the top)
    c.method_args.unfreeze_every_steps = placeholder(int)     # gradual_unfreezing: one group per N
    c.method_args.unfreeze_every_epochs = placeholder(float)  # steps, or per N epochs
    c.method_args.lora_rank = 8
    c.method_args.lora_alpha = 16.0
    c.method_args.lora_dropout = 0.0
    c.method_args.lora_targets = r".*/attention/(query|value)"  # regex on Dense module paths
    c.method_args.lora_train_bias = False   # lora: also train biases (LoRA paper: no)
    c.method_args.adapter_kind = "houlsby"  # adapter: houlsby (attention + FFN) or pfeiffer (FFN)
    c.method_args.adapter_size = 64
    c.method_args.adapter_init_std = 1e-2
    c.method_args.prompt_tokens = 20        # prompt: soft tokens before the input
    c.method_args.prompt_init = "vocab"     # prompt: vocab, text or random
    c.method_args.prompt_init_text = ""
    c.method_args.prefix_tokens = 10        # prefix: key/value prefixes per layer
    c.method_args.prefix_reparam = 0        # prefix: MLP width (0: direct parameters)
    # linear_probe: encode each split once with the frozen encoder (eval mode) into
    # W/features/ and train the head on those cached features (ftjax/feature_cache.py).
    c.method_args.cache_features = False

    # ---- data ---------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # A TFDS name ("glue/sst2", "imdb_reviews"), "rotten_tomatoes" (ftjax builder over
    # the pinned asset) or "local_text" (ftjax builder over data.files).
    c.data.name = "glue/sst2"
    c.data.data_dir = placeholder(str)  # TFDS data_dir; None: $FTJAX_CACHE/tfds
    c.data.train_split = "train"
    c.data.dev_split = "validation"
    c.data.test_split = placeholder(str)  # None: no test evaluation
    c.data.text_keys = ("sentence",)      # one key, or two for sentence pairs
    c.data.label_key = "label"
    c.data.max_length = 128
    c.data.bucket_lengths = (32, 64, 128)  # dynamic padding targets (<= max_length)
    c.data.train_limit = placeholder(int)  # use the first N train examples (smoke tests)
    c.data.eval_limit = placeholder(int)   # use the first N eval examples (smoke tests)
    c.data.shuffle_buffer = 0              # 0: full per-epoch shuffle of the index
    # >0: sort each chunk of this many shuffled batches by length before batching
    # (far less padding; batches are still shuffled). 0: plain random batches.
    c.data.group_by_length = 0
    c.data.num_workers = 0                 # grain worker processes (0 = in-process)
    # local_text builder (data.name == "local_text"): paths of CSV/TSV/JSONL files.
    c.data.files = ml_collections.ConfigDict()
    c.data.files.train = placeholder(str)
    c.data.files.dev = placeholder(str)
    c.data.files.test = placeholder(str)
    c.data.text_column = "text"
    c.data.text_pair_column = placeholder(str)
    c.data.label_column = "label"
    c.data.label_names = placeholder(tuple)  # None: inferred from the train file (sorted)
    c.data.regression = False
    # rotten_tomatoes (by movie) and bbc_news (stratified by topic) builders: seeded split fractions.
    c.data.split_seed = 0
    c.data.dev_fraction = 0.1
    c.data.test_fraction = 0.1
    # ---- image data (ftjax/data/images.py) ----
    # An image dataset: data.name "fashion_mnist" (ftjax builder over the pinned asset;
    # splits train / dev / test), "image_folder" (ftjax builder over data.folder) or a
    # TFDS catalog name whose feature data.image_key is an image ("cifar10", "mnist",
    # "oxford_flowers102", "oxford_iiit_pet").
    c.data.image_key = "image"
    c.data.folder = placeholder(str)   # image_folder: ROOT/CLASS/img or ROOT/{train,dev,test}/CLASS/img
    c.data.dev_size = 5000             # fashion_mnist: train images moved to dev (stratified, split_seed)
    c.data.image_size = 224            # square model input, pixels
    # Eval (and train_augment="none") geometry: "resize" (straight to size x size) or
    # "resize_crop" (shorter side to image_size / crop_fraction, then the center crop).
    c.data.resize = "resize_crop"
    c.data.crop_fraction = 0.875
    # Train geometry: "random_resized_crop" (Inception-style crop of crop_scale of the
    # area and crop_ratio aspect, resized to size), "pad_crop" (resize, pad by
    # crop_padding, random crop: CIFAR-style) or "none" (the eval geometry).
    c.data.train_augment = "random_resized_crop"
    c.data.crop_scale = (0.08, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.crop_padding = 4
    c.data.flip = True                 # train: random horizontal flip
    c.data.resample = "bilinear"       # PIL filter: "nearest", "bilinear", "bicubic", "lanczos"
    # Per-channel normalisation in 0..255 units: (x - mean) / std. Default ImageNet
    # (ResNet, ViT); EfficientNet-Lite uses mean (127.5,) * 3 and std (127.5,) * 3.
    c.data.mean = (123.675, 116.28, 103.53)
    c.data.std = (58.395, 57.12, 57.375)
    c.data.num_threads = 2             # image decode/resize threads (PIL releases the GIL)
    # ---- speech data (ftjax/data/speech.py, ftjax/data/audio.py) ----
    # A speech dataset: data.name "speech_manifest" (data.files.* manifests of
    # audio_path,text), "audio_folder" (data.speech.root), "accent_speech" (the offline
    # espeak-ng accent demo: train/dev/test plus dev_control/test_control) or a TFDS
    # catalog name with an Audio feature ("librispeech", "common_voice/en"; need TensorFlow).
    # Audio is decoded and log-mel'ed by data.num_threads read threads.
    c.data.max_audio_seconds = 30.0    # the model's audio window (Whisper: 30); longer manifest clips are bad rows
    c.data.max_target_length = 128     # decoder tokens (prompt + text + end); longer transcripts are cut
    # ---- prompt -> response data (task causal_lm, ftjax/data/causal.py) ----
    # The user turn: a str.format template over the example's text features; the response
    # is the feature data.response_key. With data.chat_template (and a tokenizer that has
    # one) the prompt is wrapped in the model's chat template with its assistant header.
    c.data.prompt_template = "{prompt}"
    c.data.response_key = "response"
    c.data.chat_template = True
    c.data.system_prompt = placeholder(str)   # None: the chat template's own default (if any)
    # Long sources: the feature data.truncate_key keeps its first data.truncate_tokens
    # tokens before it goes into the template (e.g. an article's first paragraphs).
    c.data.truncate_key = placeholder(str)
    c.data.truncate_tokens = placeholder(int)
    c.data.speech = ml_collections.ConfigDict()
    c.data.speech.n_mels = 80          # mel bands of the input features (128 for large-v3)
    c.data.speech.audio_column = "audio_path"  # speech_manifest: audio paths, relative to the manifest
    c.data.speech.text_column = "text"         # speech_manifest / audio_folder: the transcript column
    c.data.speech.speaker_column = "speaker"   # optional in the files
    c.data.speech.root = placeholder(str)      # audio_folder: ROOT/{train,dev,test}/metadata.csv|jsonl
    # TFDS catalog speech datasets: None picks the only Audio feature, the first of
    # text/sentence/transcript, and the feature's declared sample rate.
    c.data.speech.audio_key = placeholder(str)
    c.data.speech.text_key = placeholder(str)
    c.data.speech.sample_rate = placeholder(int)
    c.data.speech.extra_eval_splits = ()       # further catalog splits evaluated under their own names
    # accent_speech: espeak-ng accents, voice variants, split sizes, per-clip speed/pitch ranges.
    c.data.speech.accent = "en-029"            # the target accent (train, dev, test)
    c.data.speech.control_accent = "en-us"     # dev_control, test_control
    c.data.speech.voices = ("m1", "m3", "m5", "f1", "f2", "f4")
    c.data.speech.train_size = 1000
    c.data.speech.dev_size = 100
    c.data.speech.test_size = 100
    c.data.speech.control_size = 100           # each of dev_control and test_control; 0: none
    c.data.speech.seed = 0                     # sentence deal and per-clip voice/speed/pitch
    c.data.speech.speeds = (145, 185)          # words a minute, inclusive
    c.data.speech.pitches = (30, 70)           # espeak-ng pitch, inclusive
    c.data.speech.max_seconds = 10.0           # longer synthesized clips are dropped
    c.data.speech.workers = 2                  # parallel espeak-ng processes while preparing

    # ---- schedule & optimiser -------------------------------------------------
    c.batch_size = 32                  # global batch size (examples per optimizer step)
    c.accum_steps = 1                  # gradient accumulation micro-steps per optimizer step
    c.num_epochs = placeholder(float)  # duration: num_epochs, or total_steps (which wins if both set)
    c.total_steps = placeholder(int)
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"         # "adamw", "adam", "sgd" (momentum), "adafactor"
    c.optimizer.lr = 2e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.9         # sgd only
    c.optimizer.weight_decay = 0.01
    # Ordered (regex, multiplier) rules on "a/b/c" param paths; first match wins.
    # Default: no decay on biases and normalisation layers (LayerNorm, BatchNorm).
    c.optimizer.wd_rules = ((r".*/bias", 0.0), (r".*(LayerNorm|layernorm|normalization|/bn\d?)/.*", 0.0),
                            (r".*", 1.0))
    c.optimizer.lr_rules = ((r".*", 1.0),)  # (regex, lr multiplier); 0 multiplier != frozen
    c.optimizer.trainable = ((r".*", True),)  # (regex, bool); False leaves get no update, no moments
    c.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 disables
    c.schedule = ml_collections.ConfigDict()
    c.schedule.decay = "linear"        # "linear", "cosine" or "constant" after warmup
    c.schedule.warmup_fraction = 0.1   # of total steps; overridden by warmup_steps if set
    c.schedule.warmup_steps = placeholder(int)

    # ---- evaluation, checkpoints, logs ---------------------------------------
    c.eval_batch_size = 64
    c.eval_every_steps = placeholder(int)   # None: once per epoch
    c.metric = "accuracy"                   # dev metric used for best-k and early stopping
    c.metric_mode = "max"
    c.early_stopping_patience = 0           # evals without improvement; 0 disables
    # Score every eval split once before the first step too (summary "before": a
    # zero-shot baseline measured with the same data and decoding settings).
    c.eval_before_training = False
    # Sequence outputs (speech recognition): decoding on device at evaluation.
    c.generation = ml_collections.ConfigDict()
    c.generation.beams = 1                  # 1: greedy; > 1: beam search
    c.generation.max_new_tokens = 96        # tokens generated after the prompt
    c.generation.length_penalty = 1.0       # beam choice: sum log p / length ** length_penalty
    c.generation.language = placeholder(str)  # multilingual Whisper: language code ("en"); None: English-only
    # Sampling instead of greedy / beam search (decoder LMs): temperature > 0 samples,
    # from the smallest set of tokens whose probability reaches top_p.
    c.generation.temperature = 0.0
    c.generation.top_p = 1.0
    # A NaN/Inf train loss or gradient: "stop" (one line naming the step and metric; the
    # last checkpoint, saved before it, stays) or "skip" (that update is dropped).
    c.nonfinite = "stop"
    c.checkpoint_every_steps = placeholder(int)  # None: once per epoch
    c.keep_checkpoints = 2                  # most recent checkpoints kept
    c.keep_best = 1                         # best-by-metric checkpoints kept besides recent
    c.log_every_steps = 50
    c.progress_bar = True
    c.export = True                         # params-only export to W/export at the end
    return c


def set_method(c: ml_collections.ConfigDict, method: str, method_lr: dict[str, float | None],
               what: str = "") -> None:
    """Sets `c.method` and, where the setting has one, its usual learning rate.

    Args:
      c: the experiment config (unlocked).
      method: a name from the config arg method=.
      method_lr: the config's methods, each with its learning rate (None: keep
        c.optimizer.lr, the setting's own).
      what: text after the method name in the error for an unknown method
        (e.g. " for a CNN").

    Raises:
      ValueError: `method` is not in `method_lr`.
    """
    if method not in method_lr:
        raise ValueError(f"unknown method {method!r}{what}; known: {', '.join(method_lr)}")
    c.method = method
    if method_lr[method] is not None:
        c.optimizer.lr = method_lr[method]


def set_runlocal(c: ml_collections.ConfigDict, *, total_steps: int, every: int, log_every: int,
                 batch_size: int, eval_batch_size: int, eval_limit: int, train_limit: int = 256,
                 image_size: int | None = None, scratch_variant: str | None = None,
                 splits: tuple[str, str, str | None] | None = None) -> None:
    """Sets the smoke-test values of a config's `runlocal` arg.

    A subset of the data (`train_limit` and `eval_limit` examples), `total_steps`
    steps (num_epochs unset), an evaluation and a checkpoint every `every` steps.

    Args:
      c: the experiment config (unlocked).
      total_steps, every, log_every, batch_size, eval_batch_size, eval_limit,
        train_limit: as named (every: eval_every_steps and checkpoint_every_steps).
      image_size: if set, data.image_size.
      scratch_variant: if set, no pretrained weights: this model.variant from scratch.
      splits: if set, the (train, dev, test) split names.
    """
    if scratch_variant is not None:
        c.model.pretrained = None
        c.model.variant = scratch_variant
    if image_size is not None:
        c.data.image_size = image_size
    if splits is not None:
        c.data.train_split, c.data.dev_split, c.data.test_split = splits
    c.data.train_limit = train_limit
    c.data.eval_limit = eval_limit
    c.num_epochs = None
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.eval_batch_size = eval_batch_size
    c.eval_every_steps = every
    c.checkpoint_every_steps = every
    c.log_every_steps = log_every


# set_runlocal arguments of the TFDS image configs (resnet50_pets, vit_cifar10): a tiny
# model from scratch at 32 px, on the train and test splits of tfds.testing.mock_data.
TINY_IMAGE_RUNLOCAL = {"total_steps": 6, "every": 3, "log_every": 2, "batch_size": 32,
                       "eval_batch_size": 32, "eval_limit": 64, "image_size": 32,
                       "scratch_variant": "tiny", "splits": ("train", "test", None)}


@dataclasses.dataclass
class ArgSpec:
    """Typed parse of a config argument string "a,b=3,c=x"."""

    values: dict[str, Any]

    def __getattr__(self, name):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def parse_arg(arg: str | None, **spec: Any) -> ArgSpec:
    """Parses `get_config(arg)` strings with typed defaults.

    `spec` maps each allowed name to its default; the default's type is the type of
    the field. A bare name sets a bool field to True ("demo,runlocal"). Unknown names
    or values that do not parse as the field's type raise ValueError.

    Args:
      arg: the text after ":" in --config=file.py:ARG, or None.
      **spec: allowed names and their defaults.

    Returns:
      An ArgSpec with one attribute per name in `spec`.
    """
    values = dict(spec)
    for part in filter(None, (arg or "").split(",")):
        name, eq, raw = part.partition("=")
        name = name.strip()
        if name not in spec:
            raise ValueError(f"unknown config arg {name!r}; allowed: {', '.join(sorted(spec))}")
        default = spec[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {name!r} needs a value ({name}=...)")
            values[name] = True
            continue
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                values[name] = raw.lower() in ("true", "1")
            elif default is None:
                values[name] = raw
            else:
                values[name] = type(default)(raw)
        except ValueError:
            raise ValueError(
                f"config arg {name}={raw!r} is not a {type(default).__name__}") from None
    return ArgSpec(values)
