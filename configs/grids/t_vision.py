"""T-vision: EfficientNet-Lite0 on Fashion-MNIST, 6 ways to fine-tune it, 3 seeds.

  python -m ftjax.sweep --grid=configs/grids/t_vision.py --root=DIR
  python -m ftjax.report DIR --out=results/tables/t_vision

configs/effnet_fashion_mnist.py:demo (64 px, batch 64, AdamW, cosine decay, BatchNorm
statistics updated) on the first 20,000 train images (313 steps: a third of the demo's
epoch, to fit the tables' CPU budget), dev 5,000 / test 10,000 in full. Methods: full,
linear probe, freeze (stem + first 8 of 16 blocks), BitFit, layernorm (BatchNorm scale
and bias only) and full with layer-wise lr decay 0.8, each at its usual learning rate.
"""


from configs import effnet_fashion_mnist as effnet

METHODS = ("full", "linear_probe", "freeze", "bitfit", "layernorm")


def get_grid(arg=None):
    del arg
    # what configs/effnet_fashion_mnist.py:demo,method=NAME sets (an override of config.method does
    # not): the method's learning rate, and freeze's stem + first 8 blocks
    points = [{"method": m, **({"method_args.freeze_bottom_k": 8} if m == "freeze" else {}),
               "optimizer.lr": effnet.METHOD_LR[m] or 1e-3} for m in METHODS]
    points.append({"method": "full", "method_args.layerwise_lr_decay": 0.8, "optimizer.lr": 1e-3})
    return {"config": "configs/effnet_fashion_mnist.py:demo",
            "fixed": {"data.train_limit": 20000, "eval_every_steps": 0},
            "points": points, "seeds": (0, 1, 2)}
