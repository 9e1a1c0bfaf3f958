"""T-data: accuracy vs train-set size, pretrained fine-tuning vs the same architecture from scratch.

  python -m ftjax.sweep --grid=configs/grids/t_data.py:text --root=DIR_TEXT
  python -m ftjax.sweep --grid=configs/grids/t_data.py:vision --root=DIR_VISION
  python -m ftjax.report DIR --x=data.train_limit --series=model.dont_load \
      '--name=(head/.*,)=pretrained' '--name=(.*,)=from scratch' --out=results/tables/t_data_text

text: all-MiniLM-L6-v2 on Rotten Tomatoes (the demo setting, lr 5e-5); vision:
EfficientNet-Lite0 on Fashion-MNIST (the demo setting, 64 px). Train sets are the first
100, 300, 1k, 3k examples of the (shuffled at build time) train split, or all of it
(10,183 snippets / 55,000 images, given as that limit so the plots' x is a count).
"From scratch" is the same config with `model.dont_load=(".*",)`: no pretrained weight
is loaded (same architecture, tokenizer and budget). Both arms get the same steps per
size: 100 for 100 and 300 examples (tens of epochs), 320 otherwise (1 epoch of the text
train split at batch 32; a third of one Fashion-MNIST epoch at batch 64); 4 evaluations
per run. 2 seeds (3 did not fit the tables' CPU budget).

Vision runs both arms with BatchNorm momentum 0.9 (`model.bn_momentum`), not the
converted TF model's 0.99: at 0.99, 100 steps leave 37% of each running average at its
init, and the from-scratch network then scores chance (0.100) in eval mode while its
train accuracy is 0.81 (runs/t_data_vision_bn_momentum_0.99/); at 0.9 the same run
scores 0.64.
"""

SIZES = {100: 100, 300: 100, 1000: 320, 3000: 320, "all": 320}  # train examples -> steps
ALL = {"text": 10_183, "vision": 55_000}  # the train split's size: "all" is this limit, so the plots' x is a count
CONFIGS = {"text": "configs/bert_sst2.py:demo", "vision": "configs/effnet_fashion_mnist.py:demo"}
KEEP_HEAD_FRESH = {"text": ("head/.*",), "vision": ("head/.*",)}  # the configs' own dont_load
FIXED = {"text": {}, "vision": {"model.bn_momentum": 0.9}}  # both arms alike


def get_grid(arg=None):
    if arg not in CONFIGS:
        raise ValueError(f"arg must be one of {', '.join(CONFIGS)}")
    points = []
    for size, steps in SIZES.items():
        for dont_load in (KEEP_HEAD_FRESH[arg], (".*",)):
            points.append({"data.train_limit": ALL[arg] if size == "all" else size, "model.dont_load": dont_load,
                           "total_steps": steps, "eval_every_steps": steps // 4, "checkpoint_every_steps": steps // 4})
    return {"config": CONFIGS[arg], "fixed": FIXED[arg], "points": points, "seeds": (0, 1)}
