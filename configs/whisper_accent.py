r"""Fine-tune Whisper for an accent: tiny.en on espeak-ng Caribbean English, WER before and after.

  python -m ftjax.main --config=configs/whisper_accent.py:demo --workdir=/tmp/whisper_accent

Weights: the pinned offline asset `whisper_tiny_en` (CTranslate2 float16 model.bin +
tokenizer.json, read without torch or ctranslate2). Data: the `accent_speech` builder:
sentences of the pinned Rotten Tomatoes snippets (no sentence in two splits) spoken by
espeak-ng (installed from Debian when missing) in the target accent (data.speech.accent,
en-029) for train/dev/test, and in the control accent (en-us) for dev_control and
test_control, six voice variants with random speed and pitch. The run scores every
eval split before the first step (zero-shot) and after (summary.json "before" and
"dev"/"test"/"test_control"); the same window and decoding serve both.

No arg: Whisper's own 30 s window, batch 16, AdamW 1e-5 (full), 3 epochs. For a GPU/TPU.

Args (combinable):
  demo      the 2-core CPU budget: a 10 s window (the clips are <= 10 s; the encoder's
            position table is sliced to 500 of its 1500 positions, cutting its cost ~3x),
            the 1,000 train clips for 2 epochs (124 steps) at lr 1e-4, greedy decoding.
            Ours: en-029 test WER 0.656 -> 0.078, en-us control 0.351 -> 0.109, about
            21 min (results/speech/).
  runlocal  a few steps on a subset, tiny Whisper from scratch, for smoke tests.
  method=   full, freeze (the encoder), lora (q, v of both stacks), adapter, bitfit.
"""

from configs import common

METHOD_LR = {"full": None, "freeze": None, "lora": 1e-3, "adapter": 1e-3, "bitfit": 1e-3}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, demo=False, runlocal=False, method="full")
    c = common.base_config()

    c.task = "speech_recognition"
    c.model.family = "whisper"
    c.model.pretrained = "asset:whisper_tiny_en"

    c.data.name = "accent_speech"
    c.data.train_split, c.data.dev_split, c.data.test_split = "train", "dev", "test"
    c.data.max_audio_seconds = 30.0
    c.data.max_target_length = 96
    c.data.bucket_lengths = (32, 64, 96)
    c.data.speech.accent = "en-029"
    c.data.speech.control_accent = "en-us"

    c.batch_size = 16
    c.eval_batch_size = 50
    c.num_epochs = 3.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.decay = "linear"
    c.schedule.warmup_fraction = 0.1
    c.model.dropout = 0.0
    c.metric = "wer"
    c.metric_mode = "min"
    c.eval_before_training = True
    c.generation.beams = 1
    c.generation.max_new_tokens = 64
    c.log_every_steps = 10

    if a.demo:
        c.data.max_audio_seconds = 10.0
        c.num_epochs = 2.0
        c.optimizer.lr = 1e-4  # few steps: a larger step than the GPU setting's
        c.eval_every_steps = 0  # once an epoch; the best dev WER picks the final checkpoint

    common.set_method(c, a.method, METHOD_LR, what=" for Whisper")
    if a.method == "freeze":
        c.method_args.freeze = (r"whisper/encoder/.*",)

    if a.runlocal:
        common.set_runlocal(c, total_steps=4, every=2, log_every=1, batch_size=8, eval_batch_size=8,
                            eval_limit=4, train_limit=16, scratch_variant="tiny")
        c.model.tokenizer = "asset:whisper_tiny_en"
        c.data.max_audio_seconds = 6.0
        c.data.speech.train_size = 16
        c.data.speech.dev_size = c.data.speech.test_size = c.data.speech.control_size = 4
        c.data.speech.max_seconds = 6.0
        c.generation.max_new_tokens = 8

    return c.lock()
