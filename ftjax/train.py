"""The training loop: start or resume, train, evaluate, checkpoint, export, summarise."""

from __future__ import annotations

import dataclasses
import json
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


def _check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
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
    from ftjax import assets, models

    model_dir = None
    if config.model.pretrained:
        model_dir = assets.resolve_model_dir(config.model.pretrained)
        hf_config = models.load_hf_config(model_dir)
    elif config.model.variant:
        hf_config = models.variant_config(config.model.family, config.model.variant)
    else:
        raise UserError("set config.model.pretrained (a folder, hub name or asset:NAME) "
                        "or config.model.variant for a model from scratch")
    from ftjax import methods

    module = models.create_classifier(
        config.model.family, hf_config, num_labels=num_labels, pooling=config.model.pooling,
        dropout=config.model.dropout, head_dropout=config.model.head_dropout,
        dtype=config.model.dtype, peft=methods.peft(config))
    return module, hf_config, model_dir


def evaluate(eval_step, params, data, split: str, mesh, num_labels: int) -> dict[str, float]:
    """Runs the model over every example of `split` and returns its metrics."""
    metrics = evaluators.metrics_for(num_labels)
    for batch in data.eval_batches(split):
        inputs = {k: batch[k] for k in step_lib.INPUT_KEYS}
        logits = step_lib.to_host(eval_step(params, step_lib.shard_batch(inputs, mesh)))
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
    from ftjax import methods
    from ftjax.data import pipeline, tokenizer as tok_lib

    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = step_lib.make_mesh()
    _check_batch_sizes(config, mesh.size)
    rep = step_lib.replicated(mesh)

    # ---- data and model ------------------------------------------------------
    model_probe = config.model.tokenizer or config.model.pretrained
    if not model_probe:
        raise UserError("set config.model.tokenizer (a folder with tokenizer files) or config.model.pretrained")
    if config.model.tokenizer:
        tok_dir = epath.Path(config.model.tokenizer)
    else:
        from ftjax import assets
        tok_dir = assets.resolve_model_dir(config.model.pretrained)
    tok_dir = epath.Path(tok_dir)
    tokenizer = tok_lib.load_tokenizer(tok_dir)
    data = pipeline.TextData(config, tokenizer, process_index=jax.process_index(),
                             process_count=jax.process_count())
    num_labels = data.num_labels
    model, hf_config, model_dir = build_model(config, num_labels)
    steps = resolve_steps(config, data.steps_per_epoch)
    total = steps["total"]

    dummy = {k: jnp.ones((1, 8), jnp.int32) for k in step_lib.INPUT_KEYS}
    init_fn = jax.jit(lambda rng: model.init(rng, *(dummy[k] for k in step_lib.INPUT_KEYS))["params"],
                      out_shardings=rep)
    rng = jax.random.key(config.seed)
    params_rng, state_rng = jax.random.split(rng)
    param_shapes = jax.eval_shape(init_fn, params_rng)
    trainable_rules, lr_rules = methods.rules(config, int(hf_config["num_hidden_layers"]))
    start_rules = methods.start_rules(config, int(hf_config["num_hidden_layers"]), data.steps_per_epoch)
    tx, schedule, _ = optim.make_optimizer(config, param_shapes, total, trainable_rules, lr_rules, start_rules)
    trainable_mask = tree_lib.tree_from_rules(param_shapes, trainable_rules)
    total_params = tree_lib.count_params(param_shapes)
    trainable_params = optim.trainable_count(param_shapes, trainable_rules)
    if is_main:
        info(f"method {config.method}; parameters by trainable rule:\n"
             + optim.format_rule_table(param_shapes, trainable_rules))

    def make_state(params):
        return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=tx.init(params), rng=jax.random.key_data(state_rng))

    state_shapes = jax.eval_shape(make_state, param_shapes)
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
        params = init_fn(params_rng)
        if config.init_from:
            loaded, _ = ckpt_lib.load_export(config.init_from)
            # Exports hold plain models where the method merges: method parameters the
            # export lacks start fresh; those it has (adapters, prompts) are loaded.
            present = tree_lib.flatten(loaded)
            absent = tuple(p for p in PEFT_PARAMS if not any(tree_lib.any_match(k, (p,)) for k in present))
            params = tree_lib.merge(loaded, params, dont_load=absent)
            start_from = f"initialised from {config.init_from}"
        elif model_dir is not None:
            from ftjax import convert
            loaded = convert.load_pretrained(model_dir, family=config.model.family)
            # The method's own parameters (adapters, prompts, ...) are not in the checkpoint.
            dont_load = tuple(config.model.dont_load) + PEFT_PARAMS
            params = tree_lib.merge(loaded, params, dont_load=dont_load)
            start_from = f"pretrained {config.model.pretrained}"
        else:
            start_from = "scratch"
        params = methods.post_load(config, params, tokenizer)
        params = jax.device_put(params, rep)
        state = jax.jit(make_state, out_shardings=rep)(params)
    start = int(state.step)
    if is_main:
        info(f"start: {start_from}; {total} steps ({data.steps_per_epoch} an epoch) on {mesh.size} "
             f"{jax.devices()[0].platform} device(s)")

    state_sharding = jax.tree.map(lambda _: rep, state_shapes)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, num_labels=num_labels, accum_steps=config.accum_steps,
                                 trainable=trainable_mask), mesh, state_sharding)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(model), mesh, rep)

    writer = MetricWriter(workdir, enabled=is_main)
    best_value = extra.get("best_value")
    bad_evals = int(extra.get("bad_evals", 0))
    train_time = float(extra.get("train_time_s", 0.0))
    examples_seen = int(extra.get("examples_seen", 0))
    tokens_seen = int(extra.get("tokens_seen", 0))
    stopped_early = bool(extra.get("stopped_early", False))

    def extra_now():
        return {"best_value": best_value, "bad_evals": bad_evals, "train_time_s": train_time,
                "examples_seen": examples_seen, "tokens_seen": tokens_seen,
                "stopped_early": stopped_early}

    # ---- the loop ---------------------------------------------------------------
    # Train time excludes compile (the first step of this process), evals and saves.
    resumed_train_time = train_time
    loop_start, side_time, compile_s = time.perf_counter(), 0.0, None

    def train_time_now():
        return resumed_train_time + time.perf_counter() - loop_start - side_time

    bar = ProgressBar(total, start, enabled=is_main and config.progress_bar)
    pending: list[dict] = []
    window_t, window_ex, window_tok = time.perf_counter(), 0, 0
    batches = data.train_batches(start_step=start) if start < total and not stopped_early else iter(())
    for step in range(start + 1, total + 1):
        if stopped_early:
            break
        t_step, side_before = time.perf_counter(), side_time
        batch = next(batches)
        n_tok = int(batch["attention_mask"].size) * jax.process_count()
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
        pending.append(metrics)
        if step % steps["log_every"] == 0 or step == total:
            fetched = jax.device_get(pending)
            pending = []
            dt = max(time.perf_counter() - window_t, 1e-9)
            row = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
            if not np.isfinite(row["train/loss"]):
                raise FloatingPointError(f"non-finite train loss {row['train/loss']} at step {step}")
            row["lr"] = float(schedule(step - 1))
            row["examples_per_s"] = window_ex / dt
            row["tokens_per_s"] = window_tok / dt
            writer.write(step, row)
            bar.update(step, loss=row["train/loss"], ex_per_s=row["examples_per_s"])
            window_t, window_ex, window_tok = time.perf_counter(), 0, 0
        else:
            bar.update(step)

        t_side = time.perf_counter()
        if step % steps["eval_every"] == 0 or step == total:
            jax.block_until_ready(state)
            t_side = time.perf_counter()
            dev = evaluate(eval_step, state.params, data, "dev", mesh, num_labels)
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
        if step % steps["checkpoint_every"] == 0 or step == total or stopped_early:
            jax.block_until_ready(state)
            side_time += time.perf_counter() - t_side
            t_side = time.perf_counter()
            train_time = train_time_now()
            checkpointer.save(step, state, extra=extra_now(), force=True)
        side_time += time.perf_counter() - t_side
        window_t += side_time - side_before  # keep compile, eval and saves out of throughput
    train_time = train_time_now()
    if hasattr(batches, "close"):  # grain worker processes hold shared memory
        batches.close()
    bar.close()
    checkpointer.wait()

    # ---- final evaluation from the best checkpoint, export, summary ---------------
    final_step = int(state.step)
    params = checkpointer.restore_best_params(_abstract(state_shapes.params, rep))
    best_step = checkpointer.best_step()
    if params is None:
        params, best_step = state.params, final_step
    summary: dict[str, Any] = {
        "final_step": final_step, "best_step": best_step, "total_params": total_params,
        "trainable_params": trainable_params, "start": start_from,
        "dev": evaluate(eval_step, params, data, "dev", mesh, num_labels),
        "test": evaluate(eval_step, params, data, "test", mesh, num_labels) if data.has_split("test") else None,
        "train_time_s": train_time,
        "examples_per_s": examples_seen / train_time if train_time else None,
        "tokens_per_s": tokens_seen / train_time if train_time else None,
        "stopped_early": stopped_early, "num_devices": mesh.size, "compile_s": compile_s,
        "method": config.method,
        "label_names": list(data.label_names),
    }
    if config.export:
        export_dir = workdir / "export"
        meta = {"family": config.model.family, "hf_config": hf_config, "num_labels": num_labels,
                "label_names": list(data.label_names), "pooling": config.model.pooling,
                "max_length": config.data.max_length, "text_keys": list(data.text_keys),
                "step": best_step}
        if is_main:
            export = methods.merged_for_export(config, jax.device_get(params), model.peft)
            if export is None:  # adapters, prompts, prefixes: the export keeps them
                export = jax.device_get(params)
                meta["method"] = config.method
                meta["peft"] = dataclasses.asdict(model.peft)
            ckpt_lib.export_params(export_dir, export, meta)
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

