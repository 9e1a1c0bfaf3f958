"""The training loop: start or resume, train, evaluate, checkpoint, export, summarise."""

from __future__ import annotations

import dataclasses
import json
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
from ftjax import evaluators
from ftjax import optim
from ftjax import step as step_lib
from ftjax import tree as tree_lib
from ftjax.errors import UserError
from ftjax.logs import MetricWriter, ProgressBar, info

# Parameters a fine-tuning method adds, which pretrained weights and plain exports lack.
PEFT_PARAMS = (r".*/lora_[ab]", r".*/ia3_[a-z]+", r".*_adapter/.*", r".*/prompt", r".*/prefix/.*")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


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
    if config.nonfinite not in ("stop", "skip"):
        raise UserError(f"config.nonfinite={config.nonfinite!r} is not 'stop' or 'skip'")
    if config.accum_steps < 1:
        raise UserError(f"config.accum_steps={config.accum_steps} must be >= 1")
    per_micro = config.batch_size // config.accum_steps
    if config.batch_size % config.accum_steps or per_micro % num_devices:
        raise UserError(
            f"config.batch_size={config.batch_size} must split into accum_steps={config.accum_steps} "
            f"micro-batches each divisible by the {num_devices} devices")
    if config.eval_batch_size % num_devices:
        raise UserError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by "
                        f"the {num_devices} devices")


def _abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def build_model(config: ml_collections.ConfigDict, num_labels: int):
    """Returns (module, hf_config, pretrained_dir or None) for `config.model`."""
    from ftjax import assets, methods, models

    model_dir = None
    if config.model.pretrained:
        model_dir = assets.resolve_model_dir(config.model.pretrained)
        hf_config = models.load_hf_config(model_dir, family=config.model.family,
                                          variant=config.model.variant)
    elif config.model.variant:
        hf_config = models.variant_config(config.model.family, config.model.variant)
    else:
        raise UserError("set config.model.pretrained (a folder, hub name or asset:NAME) "
                        "or config.model.variant for a model from scratch")
    module = models.create_classifier(
        config.model.family, hf_config, num_labels=num_labels, pooling=config.model.pooling,
        dropout=config.model.dropout, head_dropout=config.model.head_dropout,
        dtype=config.model.dtype, peft=methods.peft(config),
        update_batch_stats=config.model.update_batch_stats,
        image_size=config.data.image_size if models.modality(config.model.family) == "image" else None)
    return module, hf_config, model_dir


def load_data(config: ml_collections.ConfigDict):
    """(data, tokenizer or None, tokenizer folder or None) for the config's modality."""
    from ftjax import models

    if models.modality(config.model.family) == "image":
        from ftjax.data import images

        return (images.ImageData(config, images.make_preprocess(config), process_index=jax.process_index(),
                                 process_count=jax.process_count()), None, None)
    from ftjax.data import pipeline, tokenizer as tok_lib

    if not (config.model.tokenizer or config.model.pretrained):
        raise UserError("set config.model.tokenizer (a folder with tokenizer files) or config.model.pretrained")
    if config.model.tokenizer:
        tok_dir = epath.Path(config.model.tokenizer)
    else:
        from ftjax import assets
        tok_dir = epath.Path(assets.resolve_model_dir(config.model.pretrained))
    tokenizer = tok_lib.load_tokenizer(tok_dir)
    data = pipeline.TextData(config, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
    return data, tokenizer, tok_dir


def make_preprocess_of(config):
    """The eval/train image preprocessing of an image config (stored in exports)."""
    from ftjax.data import images

    return images.make_preprocess(config)


def dummy_inputs(model, config) -> list[jax.Array]:
    """One-example inputs in the model's call order, for init and shape inference."""
    keys = step_lib.input_keys(model)
    if keys == ("image",):
        size = int(config.data.image_size)
        return [jnp.zeros((1, size, size, 3), jnp.float32)]
    return [jnp.ones((1, 8), jnp.int32) for _ in keys]


def _fit_position_embeddings(loaded, variables):
    """Resamples pretrained ViT position embeddings to this run's patch grid (e.g. 224 -> 384)."""
    from ftjax.models import vit

    try:
        old = loaded["params"]["vit"]["embeddings"]["position_embeddings"]
        new = variables["params"]["vit"]["embeddings"]["position_embeddings"]
    except KeyError:
        return loaded  # the strict merge names what is missing
    if old.shape != new.shape:
        side = int(round((new.shape[1] - 1) ** 0.5))
        info(f"ViT position embeddings resampled from {old.shape[1] - 1} to {new.shape[1] - 1} patches")
        loaded = jax.tree.map(lambda x: x, loaded)  # a copy; the conversion cache stays as it is
        loaded["params"]["vit"]["embeddings"]["position_embeddings"] = vit.resample_posemb(old, (side, side))
    return loaded


def load_pretrained_variables(config, model_dir, variables, num_labels: int):
    """Merges the converted pretrained weights into freshly initialised `variables`.

    The method's own parameters (adapters, prompts, ...) and `config.model.dont_load`
    keep their init; a pretrained head whose class count differs from the task's is
    not loaded (an image model's 1000 ImageNet classes, for example).
    """
    from ftjax import convert

    loaded = convert.load_pretrained_variables(model_dir, family=config.model.family)
    if config.model.family == "vit":
        loaded = _fit_position_embeddings(loaded, variables)
    dont_load = tuple(config.model.dont_load) + PEFT_PARAMS
    head = loaded.get("params", {}).get("head")
    if head is not None and np.shape(head.get("bias", ()))[-1:] != (num_labels,):
        info(f"pretrained head ({np.shape(head['bias'])[-1]} outputs) not loaded: the task has "
             f"{num_labels} labels")
        dont_load += (r"head/.*",)
    out = dict(variables)
    for collection, fresh in variables.items():
        if collection in loaded:
            out[collection] = tree_lib.merge(loaded[collection], fresh, dont_load=dont_load)
    unknown = sorted(set(loaded) - set(variables))
    if unknown:
        raise UserError(f"{model_dir} holds collections {unknown} this model does not have")
    return out


def evaluate(eval_step, variables, data, split: str, mesh, num_labels: int, input_keys) -> dict[str, float]:
    """Runs the model over every example of `split` and returns its metrics.

    Args:
      eval_step: the jitted `eval_step(variables, batch)`.
      variables: {"params": ..., **model_state}.
      data: TextData or ImageData.
      split: "dev" or "test".
      mesh: the device mesh.
      num_labels: classes (1: regression).
      input_keys: the model's input batch keys.
    """
    metrics = evaluators.metrics_for(num_labels)
    for batch in data.eval_batches(split):
        inputs = {k: batch[k] for k in input_keys}
        logits = step_lib.to_host(eval_step(variables, step_lib.shard_batch(inputs, mesh)))
        labels, mask = batch["label"], batch["mask"]
        if jax.process_count() > 1:  # each process holds its rows only: gather all of them
            rows = step_lib.shard_batch({"label": labels, "mask": mask}, mesh)
            labels, mask = step_lib.to_host(rows["label"]), step_lib.to_host(rows["mask"])
        metrics.update(logits, labels, mask)
    return metrics.result()


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes per `config`, writing checkpoints, logs, export and summary to `workdir`.

    Rerunning the same command with the same workdir continues from its last
    checkpoint. Start order: workdir checkpoint, else `config.init_from`, else the
    pretrained model, else scratch.

    Args:
      config: a locked experiment config (see configs/common.py).
      workdir: output folder (local path or gs://...).

    Returns:
      The summary dict also written to `workdir/summary.json`.
    """
    from ftjax import methods, models

    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = step_lib.make_mesh()
    _check_settings(config, mesh.size)
    rep = step_lib.replicated(mesh)

    # ---- data and model ------------------------------------------------------
    data, tokenizer, tok_dir = load_data(config)
    num_labels = data.num_labels
    model, hf_config, model_dir = build_model(config, num_labels)
    input_keys = step_lib.input_keys(model)
    layout = models.layout(config.model.family, hf_config)
    steps = resolve_steps(config, data.steps_per_epoch)
    total = steps["total"]

    dummy = dummy_inputs(model, config)
    init_fn = jax.jit(lambda rng: model.init(rng, *dummy), out_shardings=rep)
    rng = jax.random.key(config.seed)
    params_rng, state_rng = jax.random.split(rng)
    variable_shapes = jax.eval_shape(init_fn, params_rng)
    param_shapes = variable_shapes["params"]
    trainable_rules, lr_rules = methods.rules(config, layout)
    start_rules = methods.start_rules(config, layout, data.steps_per_epoch)
    tx, schedule, _ = optim.make_optimizer(config, param_shapes, total, trainable_rules, lr_rules, start_rules)
    trainable_mask = tree_lib.tree_from_rules(param_shapes, trainable_rules)
    total_params = tree_lib.count_params(param_shapes)
    trainable_params = optim.trainable_count(param_shapes, trainable_rules)
    if is_main:
        info(f"method {config.method}; parameters by trainable rule:\n"
             + optim.format_rule_table(param_shapes, trainable_rules))

    def make_state(variables):
        params = variables["params"]
        return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params), rng=jax.random.key_data(state_rng),
                                   model_state={k: v for k, v in variables.items() if k != "params"})

    state_shapes = jax.eval_shape(make_state, variable_shapes)
    fingerprint = {
        "family": config.model.family, "num_labels": num_labels, "total_params": total_params,
        "param_shapes": {k: list(v.shape) for k, v in tree_lib.flatten(param_shapes).items()},
    }
    checkpointer = ckpt_lib.Checkpointer(
        workdir, keep=config.keep_checkpoints, keep_best=config.keep_best, metric=config.metric,
        mode=config.metric_mode, fingerprint=fingerprint)

    # ---- start: resume > init_from > pretrained > scratch ----------------------
    extra: dict[str, Any] = {}
    latest = checkpointer.latest_step()
    if latest is not None:
        state, extra = checkpointer.restore(_abstract(state_shapes, rep), latest)
        start_from = f"resumed from {workdir} at step {latest}"
    else:
        variables = jax.device_get(init_fn(params_rng))
        if config.init_from:
            loaded, _ = ckpt_lib.load_export(config.init_from)
            # Exports hold plain models where the method merges: method parameters the
            # export lacks start fresh; those it has (adapters, prompts) are loaded.
            present = tree_lib.flatten(loaded)
            absent = tuple(p for p in PEFT_PARAMS if not any(tree_lib.any_match(k, (p,)) for k in present))
            variables["params"] = tree_lib.merge(loaded, variables["params"], dont_load=absent)
            for collection, value in ckpt_lib.load_export_model_state(config.init_from).items():
                if collection in variables:
                    variables[collection] = tree_lib.merge(value, variables[collection])
            start_from = f"initialised from {config.init_from}"
        elif model_dir is not None:
            variables = load_pretrained_variables(config, model_dir, variables, num_labels)
            start_from = f"pretrained {config.model.pretrained}"
        else:
            start_from = "scratch"
        variables["params"] = methods.post_load(config, variables["params"], tokenizer)
        variables = jax.device_put(variables, rep)
        state = jax.jit(make_state, out_shardings=rep)(variables)
    start = int(state.step)
    if is_main:
        info(f"start: {start_from}; {total} steps ({data.steps_per_epoch} an epoch) on {mesh.size} "
             f"{jax.devices()[0].platform} device(s)")

    state_sharding = jax.tree.map(lambda _: rep, state_shapes)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, num_labels=num_labels, accum_steps=config.accum_steps,
                                 trainable=trainable_mask, skip_nonfinite=config.nonfinite == "skip"),
        mesh, state_sharding)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model), mesh, rep)

    writer = MetricWriter(workdir, enabled=is_main)
    best_value = extra.get("best_value")
    bad_evals = int(extra.get("bad_evals", 0))
    train_time = float(extra.get("train_time_s", 0.0))
    examples_seen = int(extra.get("examples_seen", 0))
    tokens_seen = int(extra.get("tokens_seen", 0))
    stopped_early = bool(extra.get("stopped_early", False))
    skipped_steps = int(extra.get("skipped_steps", 0))

    def extra_now():
        return {"best_value": best_value, "bad_evals": bad_evals, "train_time_s": train_time,
                "examples_seen": examples_seen, "tokens_seen": tokens_seen,
                "stopped_early": stopped_early, "skipped_steps": skipped_steps}

    # ---- the loop ---------------------------------------------------------------
    # Train time excludes compile (the first step of this process), evals and saves.
    resumed_train_time = train_time
    loop_start, side_time, compile_s = time.perf_counter(), 0.0, None

    def train_time_now():
        return resumed_train_time + time.perf_counter() - loop_start - side_time

    preemption = PreemptionWatch(checkpointer)
    bar = ProgressBar(total, start, enabled=is_main and config.progress_bar)
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet fetched
    last_saved = latest

    def fetch_pending() -> list[dict]:
        """Fetches the pending step metrics; stops at the first non-finite one."""
        nonlocal skipped_steps
        fetched = jax.device_get([m for _, m in pending])
        steps_of = [s for s, _ in pending]
        pending.clear()
        for s, m in zip(steps_of, fetched):
            skipped_steps += int(m.get("skipped", 0))
            bad = [k for k in ("loss", "grad_norm", "accuracy") if k in m and not np.isfinite(m[k])]
            if bad and config.nonfinite != "skip":
                kept = (f"the last checkpoint, step {last_saved}, is kept" if last_saved is not None
                        else "no checkpoint was saved yet")
                raise NonFiniteError(
                    f"train {bad[0]} is {float(m[bad[0]])} at step {s}; stopped ({kept}). Lower "
                    "optimizer.lr or raise schedule.warmup_steps, check the data, or set "
                    "config.nonfinite=skip to drop such updates")
        return fetched
    window_t, window_ex, window_tok = time.perf_counter(), 0, 0
    batches = data.train_batches(start_step=start) if start < total and not stopped_early else iter(())
    try:
        for step in range(start + 1, total + 1):
            if stopped_early:
                break
            t_step, side_before = time.perf_counter(), side_time
            batch = next(batches)
            # tokens of the global batch, padding included (0 for images)
            n_tok = int(batch["attention_mask"].size if "attention_mask" in batch else 0) * jax.process_count()
            state, metrics = train_step(state, step_lib.shard_batch(batch, mesh))
            if compile_s is None:
                jax.block_until_ready(metrics)
                compile_s = time.perf_counter() - t_step
                side_time += compile_s
            else:
                examples_seen += config.batch_size
                tokens_seen += n_tok
                window_ex += config.batch_size
                window_tok += n_tok
            pending.append((step, metrics))
            preempted = preemption.requested(step)
            if step % steps["log_every"] == 0 or step == total or preempted:
                fetched = fetch_pending()
                dt = max(time.perf_counter() - window_t, 1e-9)
                # skipped (non-finite) steps stay out of the mean
                kept = [m for m in fetched if not m.get("skipped", 0)] or fetched
                row = {f"train/{k}": float(np.mean([m[k] for m in kept])) for k in kept[0] if k != "skipped"}
                if config.nonfinite == "skip":
                    row["train/skipped"] = float(sum(m["skipped"] for m in fetched))
                row["lr"] = float(schedule(step - 1))
                row["examples_per_s"] = window_ex / dt
                row["tokens_per_s"] = window_tok / dt
                writer.write(step, row)
                bar.update(step, loss=row["train/loss"], ex_per_s=row["examples_per_s"])
                window_t, window_ex, window_tok = time.perf_counter(), 0, 0
            else:
                bar.update(step)

            t_side = time.perf_counter()
            if pending and (step % steps["eval_every"] == 0 or step % steps["checkpoint_every"] == 0
                            or step == total):
                fetch_pending()  # never evaluate or save params a non-finite step produced
            if step % steps["eval_every"] == 0 or step == total:
                jax.block_until_ready(state)
                t_side = time.perf_counter()
                dev = evaluate(eval_step, step_lib.variables_of(state.params, state.model_state), data, "dev",
                               mesh, num_labels, input_keys)
                writer.write(step, {f"dev/{k}": v for k, v in dev.items()})
                if config.metric not in dev:
                    raise UserError(f"config.metric={config.metric!r} is not a dev metric ({', '.join(dev)})")
                value = dev[config.metric]
                if _improved(value, best_value, config.metric_mode):
                    best_value, bad_evals = value, 0
                else:
                    bad_evals += 1
                if config.early_stopping_patience and bad_evals >= config.early_stopping_patience:
                    stopped_early = True
                    info(f"early stop at step {step}: no dev {config.metric} gain in {bad_evals} evals")
                side_time += time.perf_counter() - t_side
                t_side = time.perf_counter()
                train_time = train_time_now()
                checkpointer.save_best(step, state, metrics=dev, extra=extra_now())
            if step % steps["checkpoint_every"] == 0 or step == total or stopped_early or preempted:
                jax.block_until_ready(state)
                side_time += time.perf_counter() - t_side
                t_side = time.perf_counter()
                train_time = train_time_now()
                checkpointer.save(step, state, extra=extra_now(), force=True)
                last_saved = step
            side_time += time.perf_counter() - t_side
            window_t += side_time - side_before  # keep compile, eval and saves out of throughput
            if preempted:
                checkpointer.wait()
                if hasattr(batches, "close"):
                    batches.close()
                bar.close()
                writer.close()
                checkpointer.close()
                raise Preempted(f"{preemption.reason} at step {step}: checkpoint saved in "
                                f"{workdir / 'checkpoints' / str(step)}; run the same command again to "
                                "continue from it")
    except BaseException:
        # Let a save in flight finish before the error ends the process: the last
        # checkpoint must stay whole (Orbax writes in background threads).
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise
    finally:
        preemption.close()
    train_time = train_time_now()
    if hasattr(batches, "close"):  # grain worker processes hold shared memory
        batches.close()
    bar.close()
    checkpointer.wait()

    # ---- final evaluation from the best checkpoint, export, summary ---------------
    final_step = int(state.step)
    best = checkpointer.restore_best(_abstract(ckpt_lib.best_tree(state_shapes), rep))
    best_step = checkpointer.best_step()
    if best is None:
        best, best_step = ckpt_lib.best_tree(state), final_step
    params, model_state = best["params"], best["model_state"]
    variables = step_lib.variables_of(params, model_state)
    summary: dict[str, Any] = {
        "final_step": final_step, "best_step": best_step, "total_params": total_params,
        "trainable_params": trainable_params, "start": start_from,
        "dev": evaluate(eval_step, variables, data, "dev", mesh, num_labels, input_keys),
        "test": (evaluate(eval_step, variables, data, "test", mesh, num_labels, input_keys)
                 if data.has_split("test") else None),
        "train_time_s": train_time,
        "examples_per_s": examples_seen / train_time if train_time else None,
        "tokens_per_s": tokens_seen / train_time if train_time and tokens_seen else None,
        "stopped_early": stopped_early, "num_devices": mesh.size, "compile_s": compile_s,
        "skipped_steps": skipped_steps,
        "method": config.method,
        "label_names": list(data.label_names),
    }
    if config.export:
        export_dir = workdir / "export"
        meta = {"family": config.model.family, "hf_config": hf_config, "num_labels": num_labels,
                "label_names": list(data.label_names), "pooling": config.model.pooling,
                "step": best_step}
        if tokenizer is not None:
            meta.update(max_length=config.data.max_length, text_keys=list(data.text_keys))
        else:
            meta.update(image_size=int(config.data.image_size),
                        preprocess=dataclasses.asdict(make_preprocess_of(config)))
        if is_main:
            export = methods.merged_for_export(config, jax.device_get(params), model.peft)
            if export is None:  # adapters, prompts, prefixes: the export keeps them
                export = jax.device_get(params)
                meta["method"] = config.method
                meta["peft"] = dataclasses.asdict(model.peft)
            ckpt_lib.export_params(export_dir, export, meta, model_state=jax.device_get(model_state))
            if tok_dir is not None:
                tok_out = export_dir / "tokenizer"
                tok_out.mkdir(parents=True, exist_ok=True)
                for name in TOKENIZER_FILES:
                    if (tok_dir / name).exists():
                        (tok_dir / name).copy(tok_out / name, overwrite=True)
        summary["export"] = str(export_dir)
    writer.write(final_step, {f"final_dev/{k}": v for k, v in summary["dev"].items()})
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    writer.close()
    checkpointer.close()
    return summary

