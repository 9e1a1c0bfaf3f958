"""Checks a fine-tuned decoder LM's HF export in transformers itself (not run by the suite).

  /path/to/torch-venv/bin/python results/generation/check_hf_export.py WORKDIR /path/to/ftjax-venv/bin/python

Runs `python -m ftjax.export` on WORKDIR (LoRA merged into a plain LlamaForCausalLM /
GPT2LMHeadModel folder), loads it with transformers (torch), and compares on a few
prompts written here: the logits of the same token ids against ftjax's model on the
export (max abs difference), and `generate`'s greedy continuation against
`python -m ftjax.predict`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = [
    "The government announced on Monday that it will spend an extra 2 billion pounds on new hospitals in "
    "England. The money will pay for 40 new hospitals by 2030, the health secretary said.",
    "A British tennis player won her first grand slam title on Saturday, beating the world number one in "
    "three sets in front of a full crowd.",
    "Shares in a large mobile phone maker fell sharply after it warned that sales of its new handsets had "
    "been weaker than expected over the Christmas period.",
]

_FTJAX_SIDE = r"""
import json, sys
import numpy as np
from ftjax import checkpoint as ckpt_lib, models, tasks
workdir, ids = sys.argv[1], json.loads(sys.argv[2])
params, meta = ckpt_lib.load_export(workdir)
import os
meta = {**meta, "export_dir": os.path.join(workdir, "export") if os.path.isdir(os.path.join(workdir, "export")) else workdir}
task = tasks.from_meta(meta)
model = task.build_model(meta["family"], meta["model_config"], models.EncoderOptions())
x = np.asarray(ids, np.int32)
logits = model.apply({"params": params}, x, np.ones_like(x))
np.save(sys.argv[3], np.asarray(logits, np.float32))
"""


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, ftjax_python = argv[1], argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "hf"
        subprocess.run([ftjax_python, "-m", "ftjax.export", f"--workdir={workdir}", f"--out={out}"], check=True,
                       cwd=ROOT)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        print(f"loaded {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")
        predicted = subprocess.run([ftjax_python, "-m", "ftjax.predict", f"--workdir={workdir}", *PROMPTS],
                                   check=True, cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
        meta = json.loads((pathlib.Path(workdir) / "export" / "meta.json").read_text()) \
            if (pathlib.Path(workdir) / "export").is_dir() else json.loads((pathlib.Path(workdir) / "meta.json").read_text())
        worst = 0.0
        for prompt, line in zip(PROMPTS, predicted):
            user = meta["prompt_template"].format(**{meta["truncate_key"] or "prompt": prompt})
            ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            with torch.no_grad():
                hf_logits = model(torch.tensor([ids])).logits.numpy()
                gen = model.generate(torch.tensor([ids]), max_new_tokens=meta["generation"]["max_new_tokens"],
                                     do_sample=False)
            hf_text = tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
            npy = pathlib.Path(tmp) / "logits.npy"
            subprocess.run([ftjax_python, "-c", _FTJAX_SIDE, workdir, json.dumps([ids]), str(npy)], check=True,
                           cwd=ROOT)
            diff = float(np.abs(np.load(npy) - hf_logits).max())
            worst = max(worst, diff)
            ours = line.split("\t", 1)[0]
            print(f"max |logit diff| {diff:.2e}; transformers: {hf_text!r}; ftjax: {ours!r}; "
                  f"{'same' if hf_text == ours else 'DIFFERENT'}")
        print(f"worst logit difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
