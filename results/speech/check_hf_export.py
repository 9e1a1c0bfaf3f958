"""Checks a fine-tuned Whisper's HF export in transformers itself (not run by the suite).

  /path/to/torch-venv/bin/python results/speech/check_hf_export.py WORKDIR /path/to/ftjax-venv/bin/python

Runs `python -m ftjax.export` on WORKDIR, loads the folder with transformers'
`WhisperForConditionalGeneration` (torch), and compares, on the clips in
tests/fixtures/whisper_ct2/ with HF's 30 s features: the logits of the same decoder
ids against ftjax's (max abs difference), and `generate`'s greedy transcript against
ftjax's `Predictor` with a 30 s window.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLIPS = sorted((ROOT / "tests" / "fixtures" / "whisper_ct2").glob("*.flac"))

_FTJAX_SIDE = r"""
import json, sys
import numpy as np
from ftjax import checkpoint as ckpt_lib, models, tasks
from ftjax.data import audio
workdir, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
params, meta = ckpt_lib.load_export(workdir)
meta = {**meta, "export_dir": workdir + "/export", "max_audio_seconds": 30.0}
task = tasks.from_meta(meta)
model = task.build_model(meta["family"], meta["model_config"], models.EncoderOptions())
variables = {"params": params, **ckpt_lib.load_export_model_state(workdir)}
feats = np.stack([audio.log_mel(audio.read_audio(p), seconds=30.0) for p in sys.argv[4:]])
dec = np.tile(np.asarray(ids, np.int32), (len(feats), 1))
logits = np.asarray(model.apply(variables, feats, dec))
texts = task.render(task.predict(model, variables, {"input_features": feats}))
np.savez(out, logits=logits, features=feats)
json.dump(texts, open(out + ".json", "w"))
"""


def main(workdir: str, ftjax_python: str) -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = pathlib.Path(tmp) / "hf"
        subprocess.run([ftjax_python, "-m", "ftjax.export", f"--workdir={workdir}", f"--out={hf_dir}"],
                       check=True, cwd=ROOT)
        model, info = transformers.WhisperForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        generation = json.loads((hf_dir / "generation_config.json").read_text())
        ids = [generation["decoder_start_token_id"], generation["no_timestamps_token_id"], 383, 318]
        out = str(pathlib.Path(tmp) / "ftjax")
        subprocess.run([ftjax_python, "-c", _FTJAX_SIDE, workdir, out, json.dumps(ids), *map(str, CLIPS)],
                       check=True, cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        ours = np.load(out + ".npz")
        texts = json.load(open(out + ".json"))
        feats = torch.from_numpy(ours["features"])
        with torch.no_grad():
            logits = model.eval()(input_features=feats, decoder_input_ids=torch.tensor([ids] * len(CLIPS))).logits
            generated = model.generate(feats, max_new_tokens=64)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        hf_texts = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    print(f"loading info problems: {problems or 'none'}")
    print(f"logits max abs difference: {np.abs(logits.numpy() - ours['logits']).max():.2e}")
    for clip, a, b in zip(CLIPS, texts, hf_texts):
        print(f"{clip.name}: ftjax {a!r} | transformers {b!r} | {'same' if a == b else 'DIFFERENT'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
