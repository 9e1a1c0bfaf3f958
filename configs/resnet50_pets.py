r"""Fine-tune ResNet-50 (ImageNet-1k, microsoft/resnet-50) on Oxford-IIIT Pet (37 breeds).

  python -m ftjax.main --config=configs/resnet50_pets.py --workdir=/tmp/resnet50_pets

No arg: microsoft/resnet-50 (hub name, or its HF snapshot folder via
--config.model.pretrained=PATH), 224 px with random-resized crop + flip for training
and resize 256 / center crop 224 for evaluation, ImageNet normalisation, batch 64,
SGD momentum 0.9, lr 0.01 with cosine decay over 20 epochs, weight decay 1e-4 (none on
BatchNorm and biases), BatchNorm statistics updated (batch 64). Dev is the last 10%
of TFDS's train split (3,680 images); test is TFDS's test split (3,669). Reference:
fine-tuned ResNet-50s reach about 93% top-1 on Pets (Kornblith et al. 2019, Table 2 ~92.1-93.0).

Args (combinable):
  method=   full, linear_probe, freeze, bitfit, layernorm (BatchNorm scale/bias);
            combine with --config.method_args.layerwise_lr_decay for layer-wise lr.
  runlocal  a smoke test: a tiny ResNet from scratch at 32 px on a few hundred images
            (tests run it under tfds.testing.mock_data; no download).
"""

from configs import common

METHOD_LR = {"full": None, "linear_probe": 0.1, "freeze": None, "bitfit": 0.05, "layernorm": 0.05,
             "gradual_unfreezing": None}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, method="full", runlocal=False)
    c = common.base_config()

    c.model.family = "resnet"
    c.model.pretrained = "microsoft/resnet-50"
    c.model.update_batch_stats = True
    c.model.dont_load = ("head/.*",)

    c.data.name = "oxford_iiit_pet"
    c.data.image_key, c.data.label_key = "image", "label"
    c.data.train_split, c.data.dev_split, c.data.test_split = "train[:90%]", "train[90%:]", "test"
    c.data.image_size = 224
    c.data.resize = "resize_crop"
    c.data.crop_fraction = 0.875
    c.data.train_augment = "random_resized_crop"
    c.data.flip = True

    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 20.0
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.lr = 0.01
    c.optimizer.weight_decay = 1e-4
    c.schedule.decay = "cosine"
    c.schedule.warmup_fraction = 0.02
    c.metric = "accuracy"
    c.log_every_steps = 20

    common.set_method(c, a.method, METHOD_LR, what=" for a CNN")
    if a.method == "freeze":
        c.method_args.freeze_bottom_k = 2  # the stem and stages 0-1
    if a.method == "gradual_unfreezing":
        c.method_args.unfreeze_every_epochs = 2.0

    if a.runlocal:
        common.set_runlocal(c, **common.TINY_IMAGE_RUNLOCAL)

    return c.lock()
