"""The training loop: start or resume, train, evaluate, checkpoint; the end goes to ftjax.export.

Nothing here depends on the task (ftjax/tasks/), the model family (ftjax/models/) or the
fine-tuning method (ftjax/methods/): each plugs in through its own interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from ftjax import checkpoint as ckpt_lib
from ftjax import optim
from ftjax import step as step_lib
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.logs import MetricWriter, ProgressBar, info


class NonFiniteError(UserError):
    """A NaN or Inf train metric with config.nonfinite="stop"."""


class Preempted(Exception):
    """The run stopped on a signal or a preemption notice after saving a checkpoint."""


class PreemptionWatch:
    """Turns SIGTERM/SIGINT, or a TPU preemption notice, into "save and stop".

    One process: a handler records the signal; the loop finishes the step in flight,
    saves and stops. Several processes: every one must stop at the same step, so the
    decision is JAX's preemption sync point (through Orbax), which the coordination
    service raises on all hosts when any of them gets SIGTERM or a maintenance notice.
    A second Ctrl-C stops at once.
    """

    def __init__(self, checkpointer: ckpt_lib.Checkpointer):
        self._checkpointer = checkpointer
        self._signal: int | None = None
        self._multi = jax.process_count() > 1
        self._previous: dict[int, Any] = {}
        self.reason = ""
        if not self._multi and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signal = signum

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process)."""
        if self._multi:
            if self._checkpointer.reached_preemption(step):
                self.reason = "preemption notice"
                return True
            return False
        if self._signal is not None:
            self.reason = f"stopped by {signal.Signals(self._signal).name}"
            return True
        return False

    def close(self) -> None:
        """Puts the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclasses.dataclass
class LoopState:
    """What the loop carries besides the train state; saved with every checkpoint."""

    best_value: float | None = None  # best dev config.metric so far
    bad_evals: int = 0  # evals since it last improved (early stopping)
    train_time_s: float = 0.0  # train time so far, without compiles, evals and saves
    examples_seen: int = 0  # examples of timed steps (the compile step is not timed)
    tokens_seen: int = 0  # tokens of those, padding included (0 for images)
    stopped_early: bool = False
    skipped_steps: int = 0  # non-finite steps dropped with config.nonfinite="skip"
    before: dict | None = None  # eval split -> metrics before the first step (config.eval_before_training)

    @classmethod
    def from_checkpoint(cls, extra: dict) -> "LoopState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in extra.items() if k in names})


class Stopwatch:
    """Train time = wall time since start - compile - time spent `aside()` (evals, saves)."""

    def __init__(self, resumed_s: float = 0.0):
        self._start, self._resumed = time.perf_counter(), resumed_s
        self.side_s, self.compile_s = 0.0, None
        self._aside_from: float | None = None

    @contextlib.contextmanager
    def aside(self):
        """The time inside this context is not train time."""
        self._aside_from = time.perf_counter()
        try:
            yield
        finally:
            self.side_s += time.perf_counter() - self._aside_from
            self._aside_from = None

    def compiled(self, seconds: float) -> None:
        self.compile_s = seconds
        self.side_s += seconds

    def train_s(self) -> float:
        now = time.perf_counter()
        running_aside = now - self._aside_from if self._aside_from is not None else 0.0
        return self._resumed + now - self._start - self.side_s - running_aside


def resolve_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, int]:
    """Turns every duration of the config into optimizer steps, in one place."""
    # total_steps, when set, wins: `--config.total_steps=N` works on any config.
    if config.num_epochs is None and config.total_steps is None:
        raise UserError("set config.num_epochs or config.total_steps (total_steps wins when both are set)")
    if config.total_steps is not None:
        total = int(config.total_steps)
    else:
        total = int(round(config.num_epochs * steps_per_epoch))
    if total <= 0:
        raise UserError(f"the run has {total} steps: the train split has {steps_per_epoch} "
                        "batches an epoch; lower config.batch_size or raise num_epochs/total_steps")
    every_epoch = max(min(steps_per_epoch, total), 1)
    return {
        "total": total,
        "eval_every": config.eval_every_steps or every_epoch,
        "checkpoint_every": config.checkpoint_every_steps or every_epoch,
        "log_every": max(config.log_every_steps, 1),
    }


def _check_settings(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuses, one line each, every setting that can be checked before any data is read."""
    def value(key):
        v = config
        for part in key.split("."):
            v = v[part]
        return v

    def need(key, ok, what, optional=True):  # optional: None (unset) passes
        v = value(key)
        if (v is not None or not optional) and not ok(v):
            raise UserError(f"config.{key}={v!r} {what}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need("nonfinite", lambda v: v in ("stop", "skip"), "is not 'stop' or 'skip'", optional=False)
    need("metric_mode", lambda v: v in ("max", "min"), "is not 'max' or 'min'", optional=False)
    for key in ("accum_steps", "batch_size", "eval_batch_size", "total_steps", "keep_checkpoints",
                "data.max_length", "data.train_limit", "data.eval_limit", "generation.beams",
                "generation.max_new_tokens"):
        need(key, lambda v: v >= 1, "must be >= 1")
    for key in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps", "keep_best",
                "early_stopping_patience", "schedule.warmup_steps", "data.shuffle_buffer",
                "data.group_by_length", "data.num_workers"):
        need(key, lambda v: v >= 0, "must be >= 0")
    need("num_epochs", lambda v: number(v) and v > 0, "must be > 0")
    need("optimizer.lr", lambda v: number(v) and v >= 0, "must be >= 0 (0 trains nothing: an evaluation run)")
    need("schedule.warmup_fraction", lambda v: number(v) and 0 <= v <= 1, "must be in [0, 1] (a fraction of "
         "the total steps; schedule.warmup_steps sets a count)")
    for key in ("optimizer.b1", "optimizer.b2", "optimizer.momentum", "model.dropout", "model.head_dropout",
                "method_args.lora_dropout"):
        need(key, lambda v: number(v) and 0 <= v < 1, "must be in [0, 1)")
    for key in ("optimizer.eps", "optimizer.weight_decay", "optimizer.grad_clip_norm"):
        need(key, lambda v: number(v) and v >= 0, "must be >= 0")
    need("generation.length_penalty", number, "must be a finite number")
    need("data.max_audio_seconds", lambda v: number(v) and v > 0, "must be > 0")
    per_micro = config.batch_size // config.accum_steps
    if config.batch_size % config.accum_steps or per_micro % num_devices:
        raise UserError(
            f"config.batch_size={config.batch_size} must split into accum_steps={config.accum_steps} "
            f"micro-batches each divisible by the {num_devices} devices")
    if config.eval_batch_size % num_devices:
        raise UserError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by "
                        f"the {num_devices} devices")
    from ftjax import tasks

    # setup checks again once the data has decided the task
    _check_metric(config, tasks.metric_names(config), "")


def _check_metric(config: ml_collections.ConfigDict, names, task_name: str) -> None:
    """config.metric must be one the task's evaluators return (`names`; None: not declared)."""
    if names is None or config.metric in names:
        return
    known = ", ".join(dict.fromkeys(names))
    raise UserError(f"config.metric={config.metric!r} is not a dev metric of "
                    f"{f'the {task_name} task' if task_name else 'this task'} ({known}); set config.metric "
                    "to one of them (and config.metric_mode to 'max' or 'min' to match)")


def _check_longest_input(config: ml_collections.ConfigDict, family, model, variable_shapes) -> None:
    """Traces the model once, without computing, on the longest text input the data can
    produce (data.max_length): a position table too short for it fails here, in one
    line, rather than at the first batch that long (maybe mid-run)."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    dummy = model.dummy_inputs()
    if family.modality != "text" or not set(model.input_keys) <= set(keys):
        return
    longest = [jax.ShapeDtypeStruct((1, int(config.data.max_length)), x.dtype) for x in dummy]
    jax.eval_shape(lambda v, *xs: model.apply(v, *xs, train=False), variable_shapes, *longest)


def resolve_model(config: ml_collections.ConfigDict):
    """(family name, FamilySpec, model config dict, pretrained folder or None) of `config.model`.

    The family is `config.model.family`, or, when that is unset, the one whose model
    types include the pretrained config.json's "model_type".
    """
    from ftjax import assets, models

    name, model_dir = config.model.family, None
    if config.model.pretrained:
        model_dir = assets.resolve_model_dir(config.model.pretrained)
        model_config = models.load_hf_config(model_dir, family=name, variant=config.model.variant)
        if name is None:
            name = models.family_of(model_config, f"{model_dir}/config.json")
        spec = models.family(name)
        model_type = model_config.get("model_type")
        if model_type and spec.model_types and model_type not in spec.model_types:
            raise UserError(f"{model_dir}/config.json has model_type {model_type!r}, which the {name} family "
                            f"does not read ({', '.join(spec.model_types)}); leave config.model.family unset "
                            "to choose the family by model_type, or set the one that matches")
    elif config.model.variant:
        if name is None:
            raise UserError("set config.model.family: a model from scratch (config.model.variant) needs one")
        model_config = models.variant_config(name, config.model.variant)
    else:
        raise UserError("set config.model.pretrained (a folder, hub name or asset:NAME) "
                        "or config.model.variant for a model from scratch")
    spec = models.family(name)
    if config.model.bn_momentum is not None:
        if "bn_momentum" not in {f.name for f in dataclasses.fields(spec.config_class)}:
            raise UserError(f"config.model.bn_momentum: the {name} family has no BatchNorm "
                            "(efficientnet and resnet have); leave it unset")
        if not config.model.update_batch_stats:
            raise UserError("config.model.bn_momentum has no effect unless config.model.update_batch_stats "
                            "is True (without it the running statistics never change)")
        if not 0.0 <= config.model.bn_momentum < 1.0:
            raise UserError(f"config.model.bn_momentum={config.model.bn_momentum} must be in [0, 1)")
        model_config = {**model_config, "bn_momentum": float(config.model.bn_momentum)}
    return name, spec, model_config, model_dir


def make_model(config: ml_collections.ConfigDict, task, family_name: str, model_config: dict):
    """The task's model over the family's encoder, with the method's additions."""
    from ftjax import methods, models

    family = models.family(family_name)
    methods.check_family(config, family)
    options = models.EncoderOptions(
        dtype=models.dtype(config.model.dtype), peft=methods.peft(config), dropout=config.model.dropout,
        update_batch_stats=config.model.update_batch_stats,
        image_size=config.data.image_size if family.modality == "image" else None)
    return task.build_model(family_name, model_config, options)


def build_model(config: ml_collections.ConfigDict, task):
    """(module, model config dict, pretrained folder or None) for `config.model` and `task`."""
    name, _, model_config, model_dir = resolve_model(config)
    return make_model(config, task, name, model_config), model_config, model_dir


def load_pretrained_variables(config, family, model_dir, variables):
    """Merges the converted pretrained weights into freshly initialised `variables`.

    The methods' own parameters (adapters, prompts, ...) and `config.model.dont_load`
    keep their init; so does a pretrained head whose shape differs from the task's
    (an image model's 1000 ImageNet classes, for example).
    """
    from ftjax import convert, methods

    loaded = convert.load_pretrained_variables(model_dir, family=family.name)
    if family.load is not None:
        loaded = family.load(loaded, variables)
    dont_load = tuple(config.model.dont_load) + methods.added_params()
    # parameters the family allows a checkpoint to lack (a pooler), where this one lacks them
    dont_load += tree_lib.unmatched(family.optional, loaded.get("params", {}))
    head, fresh_head = loaded.get("params", {}).get("head"), variables["params"].get("head")
    if head is not None and fresh_head is not None:
        old, new = np.shape(head.get("bias", ()))[-1:], np.shape(fresh_head.get("bias", ()))[-1:]
        if old != new:
            info(f"pretrained head ({old[0] if old else '?'} outputs) not loaded: the task's head has "
                 f"{new[0] if new else '?'}")
            dont_load += (r"head/.*",)
    out = dict(variables)
    for collection, fresh in variables.items():
        if collection in loaded:
            out[collection] = tree_lib.merge(loaded[collection], fresh, dont_load=dont_load)
    unknown = sorted(set(loaded) - set(variables))
    if unknown:
        raise UserError(f"{model_dir} holds collections {unknown} this model does not have")
    return out


def start_label(config, params) -> str:
    """The summary's "start" of a run given `config.model.pretrained`.

    "pretrained NAME", or "scratch (...)" where `model.dont_load` keeps every parameter's
    init: a from-scratch baseline of the same architecture.
    """
    paths = list(tree_lib.flatten(params))
    if paths and all(tree_lib.any_match(p, tuple(config.model.dont_load)) for p in paths):
        return f"scratch (the architecture of {config.model.pretrained}: model.dont_load keeps every init)"
    return f"pretrained {config.model.pretrained}"


@dataclasses.dataclass
class Run:
    """Everything one run is built from (see `setup`)."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    family_name: str  # config.model.family, or the one chosen by model_type
    family: Any
    task: Any
    data: Any
    model: Any
    model_config: dict
    model_dir: Any
    steps: dict[str, int]
    tx: Any
    schedule: Any
    trainable_mask: Any
    total_params: int
    trainable_params: int
    state_shapes: Any
    init: tuple  # (jitted init fn, its rng, variables -> TrainState)
    checkpointer: ckpt_lib.Checkpointer
    train_step: Any
    eval_step: Any
    features: Any = None  # feature_cache.FeatureData (also `data`) when the head trains on cached features

    @property
    def replicated(self):
        return step_lib.replicated(self.mesh)

    @property
    def predict_keys(self) -> tuple[str, ...]:
        """The batch keys the eval step takes."""
        if self.features is not None:
            return self.features.predict_keys
        return self.task.predict_keys or self.model.input_keys


def setup(config: ml_collections.ConfigDict, workdir: epath.Path) -> Run:
    """Data, task, model, optimizer, checkpointer and jitted steps of a run."""
    from ftjax import feature_cache, methods, tasks

    mesh = step_lib.make_mesh()
    _check_settings(config, mesh.size)
    replicated = step_lib.replicated(mesh)
    family_name, family, model_config, model_dir = resolve_model(config)
    cache_features = feature_cache.check_config(config, family)  # before any data is read
    task, data = tasks.create(config, family, jax.process_index(), jax.process_count())
    _check_metric(config, task.metric_names(), task.name)
    model = make_model(config, task, family_name, model_config)
    layout = family.layout(family.config(model_config))
    steps = resolve_steps(config, data.steps_per_epoch)

    dummy = model.dummy_inputs()
    init_fn = jax.jit(lambda rng: model.init(rng, *dummy), out_shardings=replicated)
    params_rng, state_rng = jax.random.split(jax.random.key(config.seed))
    variable_shapes = jax.eval_shape(init_fn, params_rng)
    _check_longest_input(config, family, model, variable_shapes)
    param_shapes = variable_shapes["params"]
    trainable_rules, lr_rules = methods.rules(config, layout)
    start_rules = methods.start_rules(config, layout, data.steps_per_epoch)
    tx, schedule = optim.make_optimizer(config, param_shapes, steps["total"], trainable_rules, lr_rules,
                                        start_rules)
    if jax.process_index() == 0:
        info(f"method {config.method}; parameters by trainable rule:\n"
             + optim.format_rule_table(param_shapes, trainable_rules))
    if optim.trainable_count(param_shapes, trainable_rules) == 0:
        raise UserError(f"method {config.method} trains no parameter of this {family.name} model (its rules "
                        "match none: no biases for bitfit, no task head for linear_probe, ...); pick another "
                        "method or add rules (config.optimizer.trainable)")
    trainable_mask = tree_lib.tree_from_rules(param_shapes, trainable_rules)
    features = None
    if cache_features:  # the head trains on what the frozen encoder computes once (ftjax/feature_cache.py)
        features = data = feature_cache.FeatureData(
            config, workdir, mesh, task, model, data, variable_shapes=variable_shapes, trainable=trainable_mask,
            describe={"family": family_name, "model_config": model_config})

    def make_state(variables):
        params = variables["params"]
        return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params), rng=jax.random.key_data(state_rng),
                                   model_state={k: v for k, v in variables.items() if k != "params"})

    state_shapes = jax.eval_shape(make_state, variable_shapes)
    total_params = tree_lib.count_params(param_shapes)
    fingerprint = {"family": family_name, **task.fingerprint(), "total_params": total_params,
                   "param_shapes": {k: list(v.shape) for k, v in tree_lib.flatten(param_shapes).items()}}
    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=config.keep_checkpoints, keep_best=config.keep_best, metric=config.metric,
        mode=config.metric_mode, fingerprint=fingerprint)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, task, accum_steps=config.accum_steps, trainable=trainable_mask,
                                 skip_nonfinite=config.nonfinite == "skip",
                                 forward=features.forward if features else None),
        mesh, jax.tree.map(lambda _: replicated, state_shapes))
    eval_fn = features.predict if features else step_lib.make_eval_step(model, task)
    eval_step = step_lib.jit_eval_step(eval_fn, mesh, replicated)
    return Run(config, workdir, mesh, family_name, family, task, data, model, model_config, model_dir, steps, tx,
               schedule, trainable_mask, total_params, optim.trainable_count(param_shapes, trainable_rules),
               state_shapes, (init_fn, params_rng, make_state), checkpointer, train_step, eval_step, features)


def initial_state(run: Run) -> tuple[Any, LoopState, str]:
    """(train state, loop state, where it came from): resume > init_from > pretrained > scratch."""
    from ftjax import methods

    config, replicated = run.config, run.replicated
    latest = run.checkpointer.latest_step()
    if latest is not None:
        state, extra = run.checkpointer.restore(step_lib.abstract(run.state_shapes, replicated), latest)
        return state, LoopState.from_checkpoint(extra), f"resumed from {run.workdir} at step {latest}"
    init_fn, params_rng, make_state = run.init
    variables = jax.device_get(init_fn(params_rng))
    if config.init_from:
        loaded, _ = ckpt_lib.load_export(config.init_from)
        # Exports hold plain models where the method merges: method parameters the
        # export lacks start fresh; those it has (adapters, prompts) are loaded.
        absent = tree_lib.unmatched(methods.added_params(), loaded)
        variables["params"] = tree_lib.merge(loaded, variables["params"], dont_load=absent)
        for collection, value in ckpt_lib.load_export_model_state(config.init_from).items():
            if collection in variables:
                variables[collection] = tree_lib.merge(value, variables[collection])
        start_from = f"initialised from {config.init_from}"
    elif run.model_dir is not None:
        variables = load_pretrained_variables(config, run.family, run.model_dir, variables)
        start_from = start_label(config, variables["params"])
    else:
        start_from = "scratch"
    variables["params"] = methods.post_load(config, variables["params"], run.data.tokenizer)
    variables = jax.device_put(variables, replicated)
    return jax.jit(make_state, out_shardings=replicated)(variables), LoopState(), start_from


def evaluate(run: Run, variables, split: str, tag: str | None = None) -> dict[str, float]:
    """Runs the task's predict over every example of `split`; returns its evaluators' metrics.

    An evaluator with a `samples()` method (a generation task's first few outputs beside
    their references) has them written to W/samples/{split}_{tag}.json when `tag` is given
    ("before", "step{N}", "final").
    """
    evaluators = run.task.evaluators()
    predict_keys = run.predict_keys
    row_keys = (*run.task.eval_keys, "mask")
    for batch in run.data.eval_batches(split):
        out = run.eval_step(variables, step_lib.shard_batch({k: batch[k] for k in predict_keys}, run.mesh))
        predictions = jax.tree.map(step_lib.to_host, out)
        rows = {k: batch[k] for k in row_keys}
        if jax.process_count() > 1:  # each process holds its rows only: gather all of them
            rows = {k: step_lib.to_host(v) for k, v in step_lib.shard_batch(rows, run.mesh).items()}
        for evaluator in evaluators:
            evaluator.update(predictions, rows)
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics.update(evaluator.result())
        if tag is not None and hasattr(evaluator, "samples") and jax.process_index() == 0:
            folder = run.workdir / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{tag}.json").write_text(json.dumps(evaluator.samples(), indent=2) + "\n")
    return metrics


def eval_splits(run: Run) -> list[str]:
    """The run's evaluation roles: dev, test when present, then any further the data offers."""
    extra = [s for s in getattr(run.data, "eval_splits", ()) if s not in ("dev", "test")]
    return ["dev"] + (["test"] if run.data.has_split("test") else []) + extra


def evaluate_before_training(run: Run, state, loop: LoopState, writer: MetricWriter) -> None:
    """With config.eval_before_training, scores every eval split once with the starting
    parameters (a zero-shot baseline); the result rides in the loop state, so a resumed
    run keeps it."""
    if not run.config.eval_before_training or loop.before is not None:
        return
    variables = step_lib.variables_of(state.params, state.model_state)
    loop.before = {split: evaluate(run, variables, split, tag="before") for split in eval_splits(run)}
    writer.write(int(state.step), {f"before_{split}/{k}": v for split, m in loop.before.items()
                                   for k, v in m.items()})
    info("before training: " + "; ".join(f"{split} {run.config.metric} {m.get(run.config.metric)}"
                                         for split, m in loop.before.items()))


def evaluate_and_track(run: Run, state, loop: LoopState, step: int, writer: MetricWriter) -> dict:
    """Dev evaluation at `step`: log it, track the best value, decide early stopping; returns it."""
    config = run.config
    dev = evaluate(run, step_lib.variables_of(state.params, state.model_state), "dev", tag=f"step{step}")
    writer.write(step, {f"dev/{k}": v for k, v in dev.items()})
    if config.metric not in dev:
        raise UserError(f"config.metric={config.metric!r} is not a dev metric ({', '.join(dev)})")
    value = dev[config.metric]
    if loop.best_value is None or (value > loop.best_value if config.metric_mode == "max"
                                   else value < loop.best_value):
        loop.best_value, loop.bad_evals = value, 0
    else:
        loop.bad_evals += 1
    if config.early_stopping_patience and loop.bad_evals >= config.early_stopping_patience:
        loop.stopped_early = True
        info(f"early stop at step {step}: no dev {config.metric} gain in {loop.bad_evals} evals")
    return dev


class _Pending:
    """Step metrics still on device; fetched in groups, checked for NaN/Inf."""

    def __init__(self, nonfinite: str, loop: LoopState):
        self.items: list[tuple[int, dict]] = []
        self.nonfinite, self.loop = nonfinite, loop
        self.last_saved: int | None = None

    def fetch(self) -> list[dict]:
        steps = [s for s, _ in self.items]
        fetched = jax.device_get([m for _, m in self.items])
        self.items.clear()
        for s, m in zip(steps, fetched):
            self.loop.skipped_steps += int(m.get("skipped", 0))
            bad = [k for k in m if k != "skipped" and not np.all(np.isfinite(m[k]))]
            if bad and self.nonfinite != "skip":
                kept = (f"the last checkpoint, step {self.last_saved}, is kept" if self.last_saved is not None
                        else "no checkpoint was saved yet")
                raise NonFiniteError(
                    f"train {bad[0]} is {float(m[bad[0]])} at step {s}; stopped ({kept}). Lower "
                    "optimizer.lr or raise schedule.warmup_steps, check the data, or set "
                    "config.nonfinite=skip to drop such updates")
        return fetched


def _log_row(fetched: list[dict], config, lr: float, examples: int, tokens: int, seconds: float) -> dict:
    kept = [m for m in fetched if not m.get("skipped", 0)] or fetched  # skipped steps stay out of the mean
    row = {f"train/{k}": float(np.mean([m[k] for m in kept])) for k in kept[0] if k != "skipped"}
    if config.nonfinite == "skip":
        row["train/skipped"] = float(sum(m["skipped"] for m in fetched))
    row.update({"lr": lr, "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds})
    return row


def _log_epoch(run: Run, train_s: float, writer: MetricWriter, step: int, since: tuple[int, float]):
    """Logs the train time (no compile, evals or saves) of the epoch ending at `step`, which
    started at `since` = (step, train time); returns the next epoch's `since`."""
    first, started = since
    per_epoch = run.data.steps_per_epoch
    if jax.process_index() == 0:
        part = "" if first == step - per_epoch else f" (steps {first + 1}-{step})"
        info(f"epoch {step // per_epoch}: {train_s - started:.2f} s of train time{part}")
    writer.write(step, {"epoch_train_s": train_s - started})
    return step, train_s


def _make_workdir(workdir: str) -> epath.Path:
    workdir = epath.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a folder: give a new folder or an earlier run's")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    return workdir


def _lock_workdir(workdir: epath.Path):
    """Process 0 takes the workdir's lock (ftjax/workdir_lock.py); every process learns
    whether it was refused, so all of them stop with it rather than wait for it."""
    from ftjax import workdir_lock

    lock, refused = workdir_lock.WorkdirLock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except UserError as e:
            refused = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(refused is not None))) and refused is None:
            raise workdir_lock.WorkdirBusy(f"process 0 could not lock workdir {workdir}: another ftjax run "
                                           "uses it (process 0's error names it)")
    if refused is not None:
        raise refused
    return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes per `config`, writing checkpoints, logs, export and summary to `workdir`.

    Rerunning the same command with the same workdir continues from its last
    checkpoint. Start order: workdir checkpoint, else `config.init_from`, else the
    pretrained model, else scratch. One run writes a workdir at a time: a second one
    is refused while the first holds its lock (local workdirs; see ftjax/workdir_lock.py).

    Args:
      config: a locked experiment config (see configs/common.py).
      workdir: output folder (local path or gs://...).

    Returns:
      The summary dict also written to `workdir/summary.json`.

    Raises:
      UserError: a bad setting or input, a workdir in use, a full disk (one line each).
    """
    workdir = _make_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        return _train_and_evaluate(config, workdir)
    except Exception as e:
        full = None if isinstance(e, UserError) else ckpt_lib.disk_full_error(e, workdir)
        if full is None:
            raise
        raise full from None
    finally:
        lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
    from ftjax import export

    run = setup(config, workdir)
    is_main, steps, total, checkpointer = jax.process_index() == 0, run.steps, run.steps["total"], run.checkpointer
    state, loop, start_from = initial_state(run)
    start = int(state.step)
    if is_main:
        info(f"start: {start_from}; {total} steps ({run.data.steps_per_epoch} an epoch) on {run.mesh.size} "
             f"{jax.devices()[0].platform} device(s)")
    latest = checkpointer.latest_step()  # not None: the state came from this workdir's checkpoint
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start if latest is not None else None)
    if run.features is not None:  # cached features: encode each split once (or load it), not train time
        run.features.encode(state, writer, start)
    watch, preemption = Stopwatch(loop.train_time_s), PreemptionWatch(checkpointer)
    epoch_from = (start, watch.train_s())
    bar = ProgressBar(total, start, enabled=is_main and config.progress_bar)
    pending = _Pending(config.nonfinite, loop)
    pending.last_saved = latest
    with watch.aside():
        evaluate_before_training(run, state, loop, writer)
    window_t, window_ex, window_tok = time.perf_counter(), 0, 0
    batches = run.data.train_batches(start_step=start) if start < total and not loop.stopped_early else iter(())
    try:
        for step in range(start + 1, total + 1):
            if loop.stopped_early:
                break
            t_step, side_before = time.perf_counter(), watch.side_s
            batch = next(batches)
            # tokens of the global batch, padding included (0 for images)
            n_tok = int(batch["attention_mask"].size if "attention_mask" in batch else 0) * jax.process_count()
            state, metrics = run.train_step(state, step_lib.shard_batch(batch, run.mesh))
            if watch.compile_s is None:
                jax.block_until_ready(metrics)
                watch.compiled(time.perf_counter() - t_step)
            else:
                loop.examples_seen += config.batch_size
                loop.tokens_seen += n_tok
                window_ex, window_tok = window_ex + config.batch_size, window_tok + n_tok
            pending.items.append((step, metrics))
            preempted = preemption.requested(step)
            if step % steps["log_every"] == 0 or step == total or preempted:
                row = _log_row(pending.fetch(), config, float(run.schedule(step - 1)), window_ex, window_tok,
                               max(time.perf_counter() - window_t, 1e-9))
                writer.write(step, row)
                bar.update(step, loss=row["train/loss"], ex_per_s=row["examples_per_s"])
                window_t, window_ex, window_tok = time.perf_counter(), 0, 0
            else:
                bar.update(step)
            evaluating = step % steps["eval_every"] == 0 or step == total
            saving = step % steps["checkpoint_every"] == 0 or step == total or preempted
            if pending.items and (evaluating or saving):
                pending.fetch()  # never evaluate or save params a non-finite step produced
            if evaluating:
                jax.block_until_ready(state)
                with watch.aside():
                    dev = evaluate_and_track(run, state, loop, step, writer)
                    loop.train_time_s = watch.train_s()
                    checkpointer.save_best(step, state, metrics=dev, extra=dataclasses.asdict(loop))
            if saving or loop.stopped_early:
                jax.block_until_ready(state)
                with watch.aside():
                    loop.train_time_s = watch.train_s()
                    checkpointer.save(step, state, extra=dataclasses.asdict(loop), force=True)
                pending.last_saved = step
            window_t += watch.side_s - side_before  # keep compile, eval and saves out of throughput
            if step % run.data.steps_per_epoch == 0:
                epoch_from = _log_epoch(run, watch.train_s(), writer, step, epoch_from)
            if preempted:
                checkpointer.wait()
                raise Preempted(f"{preemption.reason} at step {step}: checkpoint saved in "
                                f"{workdir / 'checkpoints' / str(step)}; run the same command again to "
                                "continue from it")
    except BaseException as error:
        # Let a save in flight finish before the error ends the process: the last
        # checkpoint must stay whole (Orbax writes in background threads).
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        full = None if isinstance(error, ckpt_lib.DiskFullError) else ckpt_lib.disk_full(error)
        try:
            writer.close()
        except OSError:
            if full is None:
                raise
        if full is not None:  # a log write met the full disk first: name the save it stopped
            raise checkpointer.disk_full_error(full) from None
        raise
    finally:
        preemption.close()
        if hasattr(batches, "close"):  # grain worker processes hold shared memory
            batches.close()
        bar.close()
    loop.train_time_s = watch.train_s()
    checkpointer.wait()
    summary = export.finish(run, state, loop, start_from=start_from, compile_s=watch.compile_s, writer=writer)
    writer.close()
    checkpointer.close()
    return summary
