"""The training run behind ``train.py``: build everything from a validated config, resume
from the workdir's latest checkpoint, train, log, export.

What a workdir holds: ``config.json`` (the resolved config), ``checkpoints/`` (Orbax: state and
data position), ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``loss``,
per-layer routed fractions, ...), ``tensorboard/`` (event files), and at the end ``model/``
(the trained model as an HF-style directory) and ``training.png`` (loss and routed fractions).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from l2a_jax.batch import Batch
from l2a_jax.config import ConfigError
from l2a_jax.convert import convert_to_l2a
from l2a_jax.data import embedded_corpus, make_tokenizer, read_text_files, training_batches
from l2a_jax.hf import from_hf, to_hf
from l2a_jax.memory import check_fits, plan_memory
from l2a_jax.model import QwenModel
from l2a_jax.sharding import batch_sharding, data_parallel_size, make_mesh, param_shardings
from l2a_jax.training.checkpoints import Checkpoints, abstract_like
from l2a_jax.training.report import MetricsLog, plot_run
from l2a_jax.training.run_config import RunSettings, validate
from l2a_jax.training.step import flat_metrics, init_state, jit_train_step

logger = logging.getLogger(__name__)
# sections that must match the run a workdir's checkpoints came from
_FIXED_SECTIONS = ("model", "l2a", "data")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step and checkpoint."""


def _prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, write: bool = True):
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"  # one per process of a run
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"workdir {workdir} is not writable ({e.strerror}); pass --workdir DIR"
        ) from e
    saved_file = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        changed = [
            f"{section}.{key}"
            for section in _FIXED_SECTIONS
            for key in sorted(set(saved.get(section, {})) | set(current[section]))
            if saved.get(section, {}).get(key) != current[section].get(key)
        ]
        if changed:
            raise ConfigError(
                f"workdir {workdir} holds a run with other settings ({', '.join(changed)}); "
                "resume it with its own config.json, or pass a new --workdir"
            )
    if write:
        tmp = saved_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(saved_file)


def _mesh(shape: tuple[int, int, int, int]):
    data, fsdp, seq, tensor = shape
    devices = jax.devices()
    if data == -1:
        if len(devices) % (fsdp * seq * tensor):
            raise ConfigError(
                f"config field mesh: fsdp*seq*tensor = {fsdp * seq * tensor} does not divide "
                f"the {len(devices)} devices"
            )
        data = len(devices) // (fsdp * seq * tensor)
    try:
        return make_mesh(data=data, fsdp=fsdp, seq=seq, tensor=tensor)
    except ValueError as e:
        raise ConfigError(f"config field mesh: {e}") from e


def _build_model(settings: RunSettings, mesh, seed: int) -> QwenModel:
    if settings.model is None:
        model = from_hf(
            settings.checkpoint,
            dtype=settings.dtype,
            mesh=mesh,
            attention_impl=settings.attention_impl,
            **settings.model_overrides,
        )
    else:
        model = QwenModel(
            settings.model,
            dtype=settings.dtype,
            attention_impl=settings.attention_impl,
            mesh=mesh,
            rngs=nnx.Rngs(seed),
        )
        graphdef, params = nnx.split(model)
        # from host values, which every process has whole: a sharding may span processes
        host = jax.tree.map(np.asarray, params)
        model = nnx.merge(graphdef, jax.device_put(host, param_shardings(params, mesh)))
    if settings.l2a is not None:
        if model.l2a is not None:
            raise ConfigError(
                f"checkpoint {settings.checkpoint} is already an L2A model; set "
                "l2a.enabled=False to keep training it as saved"
            )
        model = convert_to_l2a(model, settings.l2a)
    return model


def run(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Path:
    """Trains as ``config`` says into ``workdir`` (default ``config.workdir``), resuming from
    its latest checkpoint; returns the workdir."""
    workdir = Path(workdir or config.workdir)
    tokenizer = make_tokenizer(config.data.tokenizer)
    settings = validate(config, tokenizer.vocab_size)
    docs = read_text_files(list(config.data.files)) if config.data.files else embedded_corpus()
    if config.data.batch_size % jax.process_count():
        raise ConfigError(
            f"config field data.batch_size: {config.data.batch_size} rows do not split over "
            f"{jax.process_count()} processes"
        )
    _prepare_workdir(workdir, config, write=jax.process_index() == 0)
    mesh = _mesh(settings.mesh_shape)
    seed, steps = config.train.seed, config.train.steps
    model = _build_model(settings, mesh, seed)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"config field data.tokenizer: the tokenizer's vocabulary ({tokenizer.vocab_size}) "
            f"does not fit the model's ({model.cfg.vocab_size}); use the checkpoint's own "
            "tokenizer (data.tokenizer=/path/to/checkpoint)"
        )
    tokens = batch_sharding(mesh, model.attention.rules)
    parts = data_parallel_size(mesh, model.attention.rules)
    if config.data.batch_size % parts:
        raise ConfigError(
            f"config field data.batch_size: {config.data.batch_size} rows do not split over "
            f"the mesh's {parts} data-parallel devices"
        )
    t = settings.train
    plan = plan_memory(
        model,
        mesh,
        batch_size=config.data.batch_size // t.grad_accum_steps,  # one micro-batch at a time
        seq_len=config.data.seq_len,
        remat=t.remat,
        trainable=t.trainable,
        master_dtype=t.master_dtype,
        compute_dtype=t.compute_dtype,
        loss_chunk=t.loss_chunk,
    )
    logger.info("memory per device, estimated: %.2f GiB", plan.total / 2**30)
    check_fits(plan)
    graph, state, frozen = init_state(model, settings.train, seed=seed)
    layers = model.l2a_layers
    del model  # the state holds the trainable weights, ``frozen`` the rest
    batches = iter(
        training_batches(
            docs,
            tokenizer,
            seq_len=config.data.seq_len,
            batch_size=config.data.batch_size // jax.process_count(),
            seed=seed,
            needles=settings.needles,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    )
    checkpoints = Checkpoints(
        workdir / "checkpoints",
        every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints,
    )
    start = checkpoints.latest() or 0
    if start:
        state = checkpoints.restore(start, abstract_like(state), batches)
        logger.info("resumed %s at step %d", workdir, start)
    step_fn = jit_train_step(graph, settings.train, state, frozen)
    log = MetricsLog(workdir, start=start, total=steps, enabled=jax.process_index() == 0)
    tokens_per_step = config.data.seq_len * config.data.batch_size
    try:
        last_time = time.perf_counter()
        for step in range(start, steps):
            # each process holds its own rows; together they are the global batch
            local = next(batches)
            batch = Batch(
                **{k: jax.make_array_from_process_local_data(tokens, v) for k, v in local.items()}
            )
            state, metrics = step_fn(state, frozen, batch)
            done = step + 1
            due = done % config.train.checkpoint_every == 0 or done == steps
            if done % config.train.log_every == 0 or due:
                values = flat_metrics(metrics, layers)
                if not math.isfinite(values["loss"]):
                    raise NonFiniteLoss(
                        f"loss is {values['loss']} at step {done}; the last good checkpoint is "
                        f"step {checkpoints.latest()} in {checkpoints.directory} (lower "
                        "train.learning_rate or check the data, then rerun to resume there)"
                    )
                now = time.perf_counter()
                logged_steps = done - log.last_step
                values["tokens_per_s"] = tokens_per_step * logged_steps / (now - last_time)
                last_time = now
                log.write(done, values)
            log.advance(done)
            if due:
                checkpoints.save(done, state, batches, force=True)
        checkpoints.wait()
    finally:
        log.close()
        checkpoints.close()
    # every process takes part in gathering the weights; the first one writes them
    params, frozen = multihost_utils.process_allgather((state.params, frozen), tiled=True)
    if jax.process_index() == 0:
        model = graph.full_model(params, frozen)
        to_hf(model, workdir / "model", dtype=settings.dtype)
        plot_run(workdir)
    return workdir
