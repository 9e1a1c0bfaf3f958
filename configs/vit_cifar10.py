r"""Fine-tune ViT-B/16 (ImageNet-21k) on CIFAR-10: the setting of Dosovitskiy et al. 2021 / vit_jax.

  python -m ftjax.main --config=configs/vit_cifar10.py --workdir=gs://BUCKET/vit_cifar10

No arg: google/vit-base-patch16-224-in21k (hub name, or an HF snapshot folder via
--config.model.pretrained=PATH), inputs at 384 px (position embeddings resampled from
the 14x14 grid of pretraining to 24x24), batch 512, SGD momentum 0.9, lr 0.03 with
500 warmup steps then cosine decay over 10,000 steps, global-norm clipping at 1, no
weight decay, random-resized crop + flip. Expected (paper Table 5 / vit_jax README):
CIFAR-10 test accuracy about 99.0 for ViT-B/16. The test split is evaluated with the
best dev checkpoint; dev is the last 2% of the train split, as in vit_jax.

Args (combinable):
  res=N     input resolution (224 halves the cost, about 98.7).
  method=   any method of ftjax/methods/: lora, adapter, prompt (VPT), bitfit, ...
            with its usual lr.
  runlocal  a smoke test: a tiny ViT from scratch at 32 px on a few hundred images
            (tests run it under tfds.testing.mock_data; no download).
"""

from configs import common

METHOD_LR = {"full": None, "linear_probe": 0.1, "freeze": None, "gradual_unfreezing": None,
             "bitfit": 0.1, "layernorm": 0.1, "lora": 0.1, "ia3": 0.3, "adapter": 0.1,
             "prompt": 0.5, "prefix": 0.3}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, res=384, method="full", runlocal=False)
    c = common.base_config()

    c.model.family = "vit"
    c.model.pretrained = "google/vit-base-patch16-224-in21k"
    c.model.dont_load = ("head/.*",)

    c.data.name = "cifar10"
    c.data.image_key, c.data.label_key = "image", "label"
    c.data.train_split, c.data.dev_split, c.data.test_split = "train[:98%]", "train[98%:]", "test"
    c.data.image_size = a.res
    c.data.resize = "resize"
    c.data.train_augment = "random_resized_crop"
    c.data.crop_scale = (0.05, 1.0)  # Inception crop as in big_vision's fine-tuning recipes
    c.data.flip = True
    c.data.mean = (127.5, 127.5, 127.5)  # ViT: inputs in [-1, 1]
    c.data.std = (127.5, 127.5, 127.5)

    c.batch_size = 512
    c.eval_batch_size = 512
    c.total_steps = 10_000
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.lr = 0.03
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.decay = "cosine"
    c.schedule.warmup_steps = 500
    c.metric = "accuracy"
    c.log_every_steps = 50

    common.set_method(c, a.method, METHOD_LR)
    if a.method == "prompt":
        c.method_args.prompt_init = "random"
        c.method_args.prompt_tokens = 50  # VPT-shallow's usual length
    if a.method == "freeze":
        c.method_args.freeze_bottom_k = 6
    if a.method == "gradual_unfreezing":
        c.method_args.unfreeze_every_steps = 500

    if a.runlocal:
        common.set_runlocal(c, **common.TINY_IMAGE_RUNLOCAL)
        c.schedule.warmup_steps = 2

    return c.lock()
