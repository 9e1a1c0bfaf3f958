"""One fine-tuning train step of ftjax against peer implementations, at identical shapes.

  python benchmarks/peers.py [--model=bert|vit_s16|resnet50] [--shapes=32x64,32x128] [--rounds=3]
                             [--steps=5] [--warmup=2] [--peers=ftjax,hf_torch,hf_torch_compile,hf_flax]
                             [--quick] [--torch_python=/work/venv-ref/bin/python]
                             [--flax_python=/work/venv-flax/bin/python] [--out=results/perf]

The step: forward + backward + AdamW update (lr 5e-5, weight decay 0.01 off biases and
LayerNorm, as every peer's own recipe has it), dropout on, fp32, all-MiniLM-L6-v2 (offline
asset `asset:minilm`) as a 2-label sequence classifier with BERT's [CLS] pooler, on the same
random token ids (fixed seed, no padding). Peers:

  ftjax             the trainer's own jitted step (train.setup + train.initial_state)
  hf_torch          transformers BertForSequenceClassification + torch.optim.AdamW, eager,
                    torch's default thread count (one per core)
  hf_torch_1t       the same on 1 thread: with another process on the cores (a sweep), torch's
                    OpenMP threads wait on each other and 2 threads ran 4-5x slower than 1
  hf_torch_compile  the 1-thread model under torch.compile (skipped, with the reason, if it fails)
  hf_flax           FlaxBertForSequenceClassification + optax.adamw, a jax.jit step as in
                    transformers' run_flax_glue example (transformers 4.57, side venv made by
                    benchmarks/peers_env.sh)

Each (peer, shape) runs in its own process with its own python, which times --steps steps
after --warmup steps and reports them with its peak RSS. Rounds interleave the peers (A, B,
C, ... then again) so the machine's other load falls on all alike; each round also measures
a 2048x2048 fp32 matmul with jax and with torch, the peak that the GFLOP/s are read against.
Writes OUT/peers.md (a Markdown table) and OUT/peers.json (every step time).

--model=vit_s16 or --model=resnet50 times image classifiers instead (shapes BATCHxPIXELS,
default 8x224; writes OUT/peers_<model>.md/.json). No such weights are offline, so the torch
venv saves a randomly initialised HF ViTForImageClassification (ViT-S/16: hidden 384, 12
layers, 6 heads, MLP 1536, patch 16, 224 px) or ResNetForImageClassification (ResNet-50
v1.5) with 10 labels into $FTJAX_CACHE/peers/<model> once, and every peer loads that
folder, so all start from the same weights. The step: forward + backward + global-norm
clipping at 1 + AdamW (lr 5e-5, wd 0.01, none on biases and norm layers) on the same
random normal images and labels, fp32; ViT has no dropout (HF's default 0.0), ResNet's
BatchNorm runs in train mode (batch statistics, running statistics updated) on every peer.
ftjax's step is the trainer's own over its image classifier (Fashion-MNIST's 10 classes,
whose prepared data only sizes the run); hf_torch* are transformers' *ForImageClassification
with torch.optim.AdamW; hf_flax is transformers 4.57's Flax*ForImageClassification with optax
in a jax.jit step like hf_flax's (its BatchNorm statistics threaded through as a mutable collection).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

PEERS = ("ftjax", "hf_torch", "hf_torch_1t", "hf_torch_compile", "hf_flax")
LR, WD, SEED = 5e-5, 0.01, 0
DEFAULTS = {"shapes": "32x64,32x128", "rounds": "3", "steps": "3", "warmup": "2", "peers": ",".join(PEERS),
            "torch_python": "/work/venv-ref/bin/python", "flax_python": "/work/venv-flax/bin/python",
            "out": "results/perf", "model": "bert"}
NUM_IMAGE_LABELS = 10  # Fashion-MNIST's classes: the data ftjax's image peer is set up with
# Image models: random weights saved by the torch venv (HF config class, model class, kwargs),
# the ftjax config they start from, and the default shapes (batch x pixels).
IMAGE_MODELS = {
    "vit_s16": {"title": "ViT-S/16, random weights", "family": "vit", "config_file": "vit_cifar10",
                "hf_config": "ViTConfig", "hf_class": "ViTForImageClassification", "flax_class":
                "FlaxViTForImageClassification", "shapes": "8x224",
                "kwargs": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                           "intermediate_size": 1536, "patch_size": 16, "image_size": 224}},
    "resnet50": {"title": "ResNet-50 v1.5, random weights", "family": "resnet", "config_file": "resnet50_pets",
                 "hf_config": "ResNetConfig", "hf_class": "ResNetForImageClassification", "flax_class":
                 "FlaxResNetForImageClassification", "shapes": "8x224",
                 "kwargs": {"depths": [3, 4, 6, 3], "layer_type": "bottleneck", "embedding_size": 64,
                            "hidden_sizes": [256, 512, 1024, 2048]}},
}


def model_dir() -> str:
    from ftjax import assets

    return str(assets.resolve_model_dir("asset:minilm"))


def make_batch(batch: int, seq: int, vocab: int):
    """The same ids for every peer: random ids past the special tokens, no padding."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return {"input_ids": rng.integers(1000, vocab, (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "token_type_ids": np.zeros((batch, seq), np.int32),
            "label": rng.integers(0, 2, (batch,), dtype=np.int32)}


def _timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def _measure(step, holder: dict, steps: int, warmup: int) -> dict:
    """The first step (compile or first eager step), `warmup` - 1 untimed steps, then `steps` timed."""
    t0 = time.perf_counter()
    step()
    first_s, holder["first_loss"] = time.perf_counter() - t0, holder["loss"]
    _timed(step, max(warmup - 1, 0))
    times = _timed(step, steps)
    return {"first_step_s": first_s, "times": times, "loss": holder["loss"], "first_loss": holder["first_loss"]}


# ---------------------------------------------------------------- workers (one process each)

def run_ftjax(folder: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import tempfile

    import jax

    from configs import bert_sst2
    from ftjax import step as step_lib
    from ftjax import train

    config = bert_sst2.get_config("demo").unlock()
    config.batch_size = batch
    config.data.max_length = seq
    config.data.bucket_lengths = (seq,)
    config.model.pooling = "pooler"  # HF's BertForSequenceClassification head
    config.optimizer.lr, config.optimizer.weight_decay = LR, WD
    config.schedule.warmup_fraction = 0.0
    with tempfile.TemporaryDirectory() as workdir:
        run = train.setup(config, workdir)
        state, _, _ = train.initial_state(run)
        b = make_batch(batch, seq, run.model_config["vocab_size"])
        holder = {"state": state, "loss": None}

        def step():
            holder["state"], m = run.train_step(holder["state"], step_lib.shard_batch(b, run.mesh))
            holder["loss"] = float(jax.block_until_ready(m)["loss"])

        measured = _measure(step, holder, steps, warmup)
    return {**measured,
            "versions": {"jax": jax.__version__}, "threads": None}


def _torch_setup(folder: str, batch: int, seq: int):
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    model.train()
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": WD},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR)
    b = make_batch(batch, seq, model.config.vocab_size)
    inputs = {k: torch.from_numpy(v).long() for k, v in b.items() if k != "label"}
    labels = torch.from_numpy(b["label"]).long()
    return torch, transformers, model, opt, inputs, labels


def run_hf_torch(folder: str, batch: int, seq: int, steps: int, warmup: int, compile_: bool = False,
                 threads: int = 0) -> dict:
    torch, transformers, model, opt, inputs, labels = _torch_setup(folder, batch, seq)
    if threads:
        torch.set_num_threads(threads)
    fwd = torch.compile(model) if compile_ else model
    holder = {}

    def step():
        loss = fwd(**inputs, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = float(loss.detach())

    measured = _measure(step, holder, steps, warmup)
    return {**measured,
            "attn": model.config._attn_implementation,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": torch.get_num_threads()}


def run_hf_flax(folder: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from flax import traverse_util
    from flax.training import train_state
    from transformers import FlaxBertForSequenceClassification

    model = FlaxBertForSequenceClassification.from_pretrained(folder, num_labels=2, from_pt=True, seed=SEED)

    # run_flax_glue.py: AdamW with no decay on biases and LayerNorm scales.
    def decay_mask_fn(params):
        flat = traverse_util.flatten_dict(params)
        layer_norm = {p for p in flat if any("layernorm" in part.lower() for part in p)}
        return traverse_util.unflatten_dict({p: p[-1] != "bias" and p not in layer_norm for p in flat})

    tx = optax.adamw(learning_rate=LR, b1=0.9, b2=0.999, eps=1e-6, weight_decay=WD, mask=decay_mask_fn)
    state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx)

    def train_step(state, batch, dropout_rng):
        targets = batch.pop("labels")
        dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)

        def loss_fn(params):
            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
            return optax.softmax_cross_entropy(logits, jax.nn.one_hot(targets, 2)).mean()

        loss, grad = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grad), {"loss": loss}, new_dropout_rng

    # The example pmaps over devices; on one device that is this jit.
    j_step = jax.jit(train_step, donate_argnums=(0,))
    b = make_batch(batch, seq, model.config.vocab_size)
    host = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
            "token_type_ids": b["token_type_ids"], "labels": b["label"]}
    holder = {"state": state, "rng": jax.random.PRNGKey(SEED)}

    def step():
        holder["state"], m, holder["rng"] = j_step(holder["state"], {k: jnp.asarray(v) for k, v in host.items()},
                                                   holder["rng"])
        holder["loss"] = float(jax.block_until_ready(m)["loss"])

    measured = _measure(step, holder, steps, warmup)
    return {**measured,
            "versions": {"jax": jax.__version__, "transformers": transformers.__version__}, "threads": None}


# ---------------------------------------------------------------- image models (--model=vit_s16|resnet50)

def make_image_folder(model: str, folder: str) -> dict:
    """Saves a randomly initialised (seeded) HF image classifier to `folder` (torch venv)."""
    import shutil

    import torch
    import transformers

    spec = IMAGE_MODELS[model]
    torch.manual_seed(SEED)
    cfg = getattr(transformers, spec["hf_config"])(**spec["kwargs"], num_labels=NUM_IMAGE_LABELS)
    net = getattr(transformers, spec["hf_class"])(cfg)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    with open(os.path.join(tmp, "peers_spec.json"), "w") as f:
        json.dump(spec, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return {"params": sum(p.numel() for p in net.parameters()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def make_images(batch: int, size: int):
    """The same inputs for every peer: normal pixels NHWC (already "normalised") and labels."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return {"image": rng.standard_normal((batch, size, size, 3), dtype=np.float32),
            "label": rng.integers(0, NUM_IMAGE_LABELS, (batch,), dtype=np.int32)}


def run_ftjax_image(model: str, folder: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    import importlib
    import tempfile

    import jax

    from ftjax import step as step_lib
    from ftjax import train

    spec = IMAGE_MODELS[model]
    arg = f"res={size}" if spec["family"] == "vit" else None
    config = importlib.import_module(f"configs.{spec['config_file']}").get_config(arg).unlock()
    config.model.pretrained, config.model.dont_load = folder, ()  # the head too: same start as HF
    config.data.name, config.data.image_size = "fashion_mnist", size
    config.data.train_split, config.data.dev_split, config.data.test_split = "train", "dev", None
    config.batch_size, config.total_steps = batch, 1000
    config.optimizer.name, config.optimizer.lr, config.optimizer.weight_decay = "adamw", LR, WD
    config.optimizer.grad_clip_norm = 1.0
    config.schedule.warmup_fraction, config.schedule.warmup_steps = 0.0, None
    with tempfile.TemporaryDirectory() as workdir:
        run = train.setup(config, workdir)
        state, _, _ = train.initial_state(run)
        b = make_images(batch, size)
        holder = {"state": state, "loss": None}

        def step():
            holder["state"], m = run.train_step(holder["state"], step_lib.shard_batch(b, run.mesh))
            holder["loss"] = float(jax.block_until_ready(m)["loss"])

        out = _measure(step, holder, steps, warmup)
    bn = ("train" if config.model.update_batch_stats else "frozen") if spec["family"] == "resnet" else None
    return {**out, "versions": {"jax": jax.__version__}, "threads": None, "batch_norm": bn}


def run_torch_image(model: str, folder: str, batch: int, size: int, steps: int, warmup: int,
                    compile_: bool = False, threads: int = 0) -> dict:
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    net = getattr(transformers, IMAGE_MODELS[model]["hf_class"]).from_pretrained(folder)
    net.train()  # ResNet: batch statistics, running statistics updated
    params = list(net.named_parameters())
    groups = [{"params": [p for _, p in params if p.ndim > 1], "weight_decay": WD},  # not biases, norms
              {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR)
    b = make_images(batch, size)
    pixels = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(b["label"]).long()
    fwd = torch.compile(net) if compile_ else net
    holder = {}

    def step():
        loss = fwd(pixel_values=pixels, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        holder["loss"] = float(loss.detach())

    out = _measure(step, holder, steps, warmup)
    vit = IMAGE_MODELS[model]["family"] == "vit"
    return {**out, "attn": net.config._attn_implementation if vit else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "threads": torch.get_num_threads(), "batch_norm": None if vit else "train"}


def run_flax_image(model: str, folder: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from flax.training import train_state

    net = getattr(transformers, IMAGE_MODELS[model]["flax_class"]).from_pretrained(folder, from_pt=True,
                                                                                    seed=SEED)
    bn = "batch_stats" in net.params  # ResNet: {"params", "batch_stats"}; ViT: the params themselves
    params = net.params["params"] if bn else net.params
    decay = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # not biases, norms
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD, mask=decay))
    state = train_state.TrainState.create(apply_fn=net.__call__, params=params, tx=tx)

    def train_step(state, stats, pixels, labels, dropout_rng):
        def loss_fn(p):
            if bn:
                out, new = state.apply_fn(pixels, params={"params": p, "batch_stats": stats}, train=True)
                return optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean(), new["batch_stats"]
            out = state.apply_fn(pixels, params=p, dropout_rng=dropout_rng, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(out.logits, labels).mean(), stats

        (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grad), stats, loss

    j_step = jax.jit(train_step, donate_argnums=(0, 1))
    b = make_images(batch, size)
    pixels, labels = jnp.asarray(b["image"].transpose(0, 3, 1, 2)), jnp.asarray(b["label"])  # HF Flax: NCHW
    holder = {"state": state, "stats": net.params["batch_stats"] if bn else {}, "rng": jax.random.PRNGKey(SEED)}

    def step():
        holder["state"], holder["stats"], loss = j_step(holder["state"], holder["stats"], pixels, labels,
                                                        holder["rng"])
        holder["loss"] = float(jax.block_until_ready(loss))

    out = _measure(step, holder, steps, warmup)
    return {**out, "versions": {"jax": jax.__version__, "transformers": transformers.__version__},
            "threads": None, "batch_norm": "train" if bn else None}


def run_matmul(lib: str, n: int = 2048, reps: int = 10) -> dict:
    """Best-of fp32 n x n matmul GFLOP/s: the peak the step's matmul rate is read against."""
    if lib == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(f(a, a))
        times = _timed(lambda: jax.block_until_ready(f(a, a)), reps)
    else:
        import torch

        a = torch.randn(n, n)
        a @ a
        times = _timed(lambda: a @ a, reps)
    return {"times": times, "gflops": 2 * n**3 / min(times) / 1e9}


def worker(args: dict) -> None:
    name = args["worker"]
    model = args.get("model", "bert")
    if name.startswith("matmul_"):
        out = run_matmul(name.split("_", 1)[1])
    elif name == "make_folder":
        out = make_image_folder(model, args["model_dir"])
    elif model in IMAGE_MODELS:
        batch, size = (int(x) for x in args["shape"].split("x"))
        fn = {"ftjax": run_ftjax_image, "hf_torch": run_torch_image, "hf_flax": run_flax_image,
              "hf_torch_1t": lambda *a: run_torch_image(*a, threads=1),
              "hf_torch_compile": lambda *a: run_torch_image(*a, compile_=True, threads=1)}[name]
        out = fn(model, args["model_dir"], batch, size, int(args["steps"]), int(args["warmup"]))
    else:
        batch, seq = (int(x) for x in args["shape"].split("x"))
        fn = {"ftjax": run_ftjax, "hf_torch": run_hf_torch, "hf_flax": run_hf_flax,
              "hf_torch_1t": lambda *a: run_hf_torch(*a, threads=1),
              "hf_torch_compile": lambda *a: run_hf_torch(*a, compile_=True, threads=1)}[name]
        out = fn(args["model_dir"], batch, seq, int(args["steps"]), int(args["warmup"]))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("PEERS_RESULT " + json.dumps(out))


# ---------------------------------------------------------------- parent

def matmul_flops(cfg: dict, batch: int, seq: int) -> float:
    """Matmul FLOPs of one BERT classifier forward + backward (backward = 2x forward).

    6 x (parameters in matmuls) x tokens for the encoder's dense layers, plus the attention
    score (QK^T) and context (PV) matmuls, 2 x B x S^2 x H each forward, plus the pooler and
    the head on the B [CLS] rows. Embedding lookups, softmax, LayerNorm and the optimizer
    are not matmuls and are not counted.
    """
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tokens = batch * seq
    dense = 6 * (4 * h * h + 2 * h * i) * tokens
    attention = 3 * 2 * (2 * batch * seq * seq * h)
    head = 6 * (h * h + h * 2) * batch
    return layers * (dense + attention) + head


def image_flops(model: str, batch: int, size: int) -> float:
    """Matmul + convolution FLOPs of one image classifier forward + backward, from the layer shapes.

    2 FLOPs a multiply-add. Backward is 2x forward (input and weight gradients), except the
    first layer (ViT's patch projection, ResNet's 7x7 stem), whose input, the images, needs
    no gradient: 1x. ViT adds the attention score (QK^T) and context (PV) matmuls. Norms,
    activations, softmax, pooling, residual adds and the optimizer are not counted.
    """
    spec = IMAGE_MODELS[model]["kwargs"]
    if IMAGE_MODELS[model]["family"] == "vit":
        d, i, p = spec["hidden_size"], spec["intermediate_size"], spec["patch_size"]
        n = (size // p) ** 2
        t = n + 1
        first = 2 * n * p * p * 3 * d
        layer = 2 * (4 * d * d + 2 * d * i) * t + 2 * 2 * t * t * d
        head = 2 * d * NUM_IMAGE_LABELS
        return batch * (2 * first + 3 * (spec["num_hidden_layers"] * layer + head))
    # ResNet v1.5 bottleneck: 1x1 (width/4), 3x3 stride s, 1x1 (width); 1x1/s shortcut where the shape changes.
    side = (size + 2 * 3 - 7) // 2 + 1  # 7x7/2 stem, padding 3
    first = 2 * side * side * 7 * 7 * 3 * spec["embedding_size"]
    side = (side + 2 - 3) // 2 + 1  # 3x3/2 max pool, padding 1
    rest, cin = 0, spec["embedding_size"]
    for stage, (width, depth) in enumerate(zip(spec["hidden_sizes"], spec["depths"])):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            out = (side - 1) // stride + 1
            inner = width // 4
            rest += 2 * side * side * cin * inner + 2 * out * out * 9 * inner * inner + 2 * out * out * inner * width
            if cin != width or stride != 1:
                rest += 2 * out * out * cin * width
            side, cin = out, width
    rest += 2 * cin * NUM_IMAGE_LABELS
    return batch * (2 * first + 3 * rest)


def image_folder(model: str, args: dict) -> str:
    """$FTJAX_CACHE/peers/<model>: the random-weight HF folder, saved once by the torch venv."""
    from ftjax import assets

    folder = str(assets.cache_dir() / "peers" / model)
    try:
        with open(os.path.join(folder, "peers_spec.json")) as f:
            if json.load(f) == IMAGE_MODELS[model]:
                return folder
    except (OSError, ValueError):
        pass
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    r = spawn("make_folder", args, None, folder)
    if "error" in r:
        sys.exit(f"could not save a random {model} with {args['torch_python']}: {r['error']}")
    print(f"saved a random-weight {model} ({r['params']:,} parameters) to {folder}", flush=True)
    return folder


def _python_for(peer: str, args: dict) -> str:
    if peer.startswith(("hf_torch", "matmul_torch")) or peer == "make_folder":
        return args["torch_python"]
    if peer == "hf_flax":
        return args["flax_python"]
    return sys.executable


def spawn(peer: str, args: dict, shape: str | None, folder: str) -> dict:
    cmd = [_python_for(peer, args), os.path.abspath(__file__), f"--worker={peer}", f"--model_dir={folder}",
           f"--model={args['model']}", f"--steps={args['steps']}", f"--warmup={args['warmup']}"]
    cmd += [f"--shape={shape}"] if shape else []
    env = {**os.environ, "PYTHONPATH": ROOT if peer in ("ftjax", "matmul_jax") else ""}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("PEERS_RESULT ")]
    if r.returncode or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()
        reason = next((x for x in reversed(tail) if x.strip() and not x.startswith(" ")), "no output")
        return {"error": reason[-400:], "stderr_tail": "\n".join(tail[-30:])}
    out = json.loads(lines[-1][len("PEERS_RESULT "):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def _git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def table(results: dict, cfg: dict, shapes: list[str], peers: list[str], model: str = "bert") -> list[str]:
    peak = {lib: statistics.median(r["gflops"] for r in results["matmul"][lib] if "gflops" in r)
            if any("gflops" in r for r in results["matmul"][lib]) else None for lib in ("jax", "torch")}
    image = model in IMAGE_MODELS
    unit, kind = ("images", "matmul+conv") if image else ("tokens", "matmul")
    lines = [(f"| shape | peer | median step (s) | min–max (s) | {unit}/s | {kind} GFLOP/s | % of matmul peak "
              "| peak RSS (MB) | first step (s) | ftjax / peer (time) |" + (" loss at step 1 |" if image else "")),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if image else "")]
    for shape in shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        flops = image_flops(model, batch, seq) if image else matmul_flops(cfg, batch, seq)
        runs = results["steps"][shape]
        med = {p: statistics.median(t for r in runs[p] if "times" in r for t in r["times"])
               for p in peers if any("times" in r for r in runs[p])}
        for p in peers:
            if p not in med:
                errs = {r.get("error") for r in runs[p]}
                lines.append(f"| {shape} | {p} | skipped: {'; '.join(sorted(e for e in errs if e))} "
                             "| | | | | | | |" + (" |" if image else ""))
                continue
            ok = [r for r in runs[p] if "times" in r]
            all_t = [t for r in ok for t in r["times"]]
            lib = "torch" if p.startswith("hf_torch") else "jax"
            gf = flops / med[p] / 1e9
            frac = f"{100 * gf / peak[lib]:.0f}% of {lib} {peak[lib]:.0f}" if peak[lib] else "n/a"
            ratio = f"{med['ftjax'] / med[p]:.2f}" if "ftjax" in med else "n/a"
            rate = batch / med[p] if image else batch * seq / med[p]
            lines.append(f"| {shape} | {p} | {med[p]:.3f} | {min(all_t):.3f}–{max(all_t):.3f} "
                         f"| {rate:,.{1 if image else 0}f} | {gf:.0f} | {frac} "
                         f"| {max(r['peak_rss_mb'] for r in ok):,.0f} "
                         f"| {statistics.median(r['first_step_s'] for r in ok):.1f} | {ratio} |"
                         + (f" {ok[0]['first_loss']:.4f} |" if image else ""))
    return lines


def main() -> None:
    raw = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    if "worker" in raw:
        worker(raw)
        return
    unknown = [a for a in sys.argv[1:] if a.lstrip("-").split("=", 1)[0] not in {*DEFAULTS, "quick"}]
    if unknown:
        sys.exit(f"unknown option(s) {unknown}; known: {sorted(DEFAULTS)} and --quick")
    args = {**DEFAULTS, **raw}
    if "--quick" in sys.argv[1:]:
        args.update({"rounds": raw.get("rounds", "1"), "steps": raw.get("steps", "2"),
                     "warmup": raw.get("warmup", "1")})
    model = args["model"]
    if model not in ("bert", *IMAGE_MODELS):
        sys.exit(f"--model={model}: choose bert (MiniLM-L6), {' or '.join(IMAGE_MODELS)}")
    if model in IMAGE_MODELS and "shapes" not in raw:
        args["shapes"] = IMAGE_MODELS[model]["shapes"]
    shapes, peers = args["shapes"].split(","), args["peers"].split(",")
    fixed = IMAGE_MODELS.get(model, {}).get("kwargs", {}).get("image_size")
    if fixed and any(int(s.split("x")[1]) != fixed for s in shapes):
        sys.exit(f"--shapes={args['shapes']}: {model}'s position embeddings are for {fixed} px; use Bx{fixed}")
    bad = [p for p in peers if p not in PEERS]
    if bad or "ftjax" not in peers:
        sys.exit(f"--peers must include ftjax and name only {PEERS}; got {peers}")
    for p in {_python_for(p, args) for p in peers}:
        if not os.path.exists(p):
            sys.exit(f"{p} not found: run `bash benchmarks/peers_env.sh` for the Flax venv, or pass "
                     "--torch_python= / --flax_python=")
    folder = image_folder(model, args) if model in IMAGE_MODELS else model_dir()
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    results = {"steps": {s: {p: [] for p in peers} for s in shapes}, "matmul": {"jax": [], "torch": []}}
    broken: dict[str, str] = {}
    for rnd in range(int(args["rounds"])):
        for lib in ("jax", "torch"):
            r = spawn(f"matmul_{lib}", args, None, folder)
            results["matmul"][lib].append(r)
            print(f"round {rnd + 1}: matmul {lib}: " + (f"{r['gflops']:.0f} GFLOP/s" if "gflops" in r
                                                        else r["error"]), flush=True)
        for shape in shapes:
            for p in peers:
                if p in broken:  # failed once (torch.compile on this CPU): do not retry each round
                    results["steps"][shape][p].append({"error": broken[p]})
                    continue
                r = spawn(p, args, shape, folder)
                results["steps"][shape][p].append(r)
                if "error" in r:
                    print(f"round {rnd + 1}: {shape} {p}: FAILED, skipped from now on: {r['error']}", flush=True)
                    broken[p] = r["error"]
                else:
                    print(f"round {rnd + 1}: {shape} {p}: median {statistics.median(r['times']):.3f} s, "
                          f"first {r['first_step_s']:.1f} s, loss {r['loss']:.4f}, "
                          f"RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    command = "python benchmarks/peers.py " + " ".join(sys.argv[1:])
    meta = {"command": command.strip(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": _cpu_name(), "commit": _git_commit(), "model": "all-MiniLM-L6-v2 (asset:minilm)",
            "args": args, "load": os.getloadavg()}
    if model in IMAGE_MODELS:
        meta.update(model=IMAGE_MODELS[model]["title"], model_dir=folder, model_config=IMAGE_MODELS[model]["kwargs"],
                    flops={s: image_flops(model, *map(int, s.split("x"))) for s in shapes})
    else:
        meta.update(model_config={k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "num_attention_heads", "vocab_size")},
                    matmul_flops={s: matmul_flops(cfg, *map(int, s.split("x"))) for s in shapes})
    versions = {}
    for s in shapes:
        for p in peers:
            for r in results["steps"][s][p]:
                if "versions" in r:
                    versions[p] = {**r["versions"], "threads": r.get("threads"), "attn": r.get("attn")}
    meta["versions"] = versions
    lines = table(results, cfg, shapes, peers, model)
    if model in IMAGE_MODELS:
        step_lines = [
            ("- shape: batch x pixels (square RGB); step: forward + backward + global-norm clipping at 1 + AdamW "
             "(lr 5e-5, wd 0.01, none on biases and norm layers), fp32, the same random normal images and "
             f"labels (10 classes) on every peer, all loading the same random-weight (seed 0) HF folder {folder}, "
             f"config {json.dumps(IMAGE_MODELS[model]['kwargs'])}"),
            ("- ViT: no dropout on any peer (hidden and attention dropout 0.0, HF's default)" if model == "vit_s16"
             else "- ResNet: BatchNorm in train mode on every peer (batch statistics; running statistics updated)"),
            ("- matmul+conv GFLOP/s: analytic FLOPs from the layer shapes (2 a multiply-add; matmuls and "
             "convolutions, ViT's attention QK^T and PV included; forward + backward = 3x forward, 2x for the "
             "first layer, whose input needs no gradient) / median step; peak = best 2048x2048 fp32 matmul, "
             "median over rounds, of the library the peer runs on (convolutions are read against it too)"),
            "- loss at step 1: the first step's loss in round 1; equal values show the peers start alike"]
    else:
        step_lines = [
            "- step: forward + backward + AdamW (lr 5e-5, wd 0.01), dropout on, fp32, same random ids, no padding",
            ("- matmul GFLOP/s: analytic matmul FLOPs (6 x matmul params x tokens + attention QK^T and PV, "
             "forward + backward) / median step; peak = best 2048x2048 fp32 matmul, median over rounds, of the "
             "library the peer runs on")]
    md = [f"# One train step, ftjax against peers ({meta['model']})", "",
          f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
          f"- commit: {meta['commit']}",
          (f"- {args['rounds']} rounds x {args['steps']} timed steps after {args['warmup']} warm-up steps, "
          "each peer and shape in its own process, rounds interleaved"), *step_lines,
          ("- hf_torch runs torch's default threads (one per core); hf_torch_1t and hf_torch_compile run 1 "
          "thread: with other load on the cores, torch's OpenMP threads wait on each other"),
          "- first step: compile (jax, torch.compile) or first eager step, in seconds",
          f"- versions: {json.dumps(versions)}", ""] + lines + [""]
    out = os.path.join(ROOT, args["out"])
    os.makedirs(out, exist_ok=True)
    name = "peers" if model == "bert" else f"peers_{model}"
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {out}/{name}.md and {name}.json")


if __name__ == "__main__":
    main()
