"""train.py end to end on a CPU: a run, a run killed (SIGKILL) mid-training and mid-save and
resumed, bad configs and damaged checkpoints."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from l2a_jax import ConfigError
from l2a_jax.training.report import read_metrics
from l2a_jax.training.run_config import default_config, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# configs/tiny.py, shrunk so a run takes seconds
SMALL = [
    "--config.model.hidden_size=32",
    "--config.model.intermediate_size=64",
    "--config.model.num_layers=2",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.model.head_dim=16",
    "--config.l2a.window=16",
    "--config.data.seq_len=400",
    "--config.data.batch_size=2",
    "--config.data.needle_rate=0.3",
    "--config.train.steps=12",
    "--config.train.warmup_steps=2",
    "--config.train.sparsity_warmup_steps=2",
    "--config.train.checkpoint_every=3",
    "--config.train.log_every=1",
]


def command(workdir, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.py"),
            "--workdir", str(workdir), *SMALL, *extra]  # fmt: skip


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def train(workdir, *extra, check=True):
    done = subprocess.run(command(workdir, *extra), env=env(), capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(workdir):
    return [(r["step"], r["loss"], r["routed_fraction"]) for r in read_metrics(workdir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train(workdir)
    return workdir


@pytest.mark.slow
def test_a_run_writes_everything_a_user_expects(uninterrupted):
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"loss", "cross_entropy", "layer0/routed_fraction", "tokens_per_s"} <= set(records[0])
    assert records[-1]["cross_entropy"] < records[0]["cross_entropy"]
    for name in ("config.json", "training.png", "model/config.json", "model/model.safetensors"):
        assert (uninterrupted / name).exists(), name
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((uninterrupted / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["steps"] == 12
    # the exported model loads and is an L2A model
    from l2a_jax import from_hf

    model = from_hf(uninterrupted / "model", attention_impl="xla")
    assert model.l2a is not None and model.l2a.window == 16


def run_until(workdir, stop) -> None:
    """Starts a run and SIGKILLs it as soon as ``stop()`` is true."""
    proc = subprocess.Popen(command(workdir), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not stop():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def logged_step(workdir) -> int:
    try:
        return max((r["step"] for r in read_metrics(workdir)), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_killed_mid_training_resumes_with_identical_losses(uninterrupted, tmp_path):
    kill_at = 7  # between the checkpoints at 6 and 9
    run_until(tmp_path, lambda: logged_step(tmp_path) >= kill_at)
    assert logged_step(tmp_path) < 12
    train(tmp_path)
    assert losses(tmp_path) == losses(uninterrupted)


@pytest.mark.slow
def test_killed_mid_save_resumes_with_identical_losses(uninterrupted, tmp_path):
    checkpoints = tmp_path / "checkpoints"

    def saving():  # Orbax writes into a temporary directory and renames it when complete
        return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir())

    run_until(tmp_path, saving)
    train(tmp_path)
    assert losses(tmp_path) == losses(uninterrupted)


@pytest.mark.slow
def test_damaged_checkpoint_gets_one_clear_error_and_nothing_is_lost(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "run")
    run = tmp_path / "run"
    latest = run / "checkpoints" / "12"
    for file in latest.rglob("*"):
        if file.is_file() and file.stat().st_size > 0 and "state" in str(file):
            file.write_bytes(b"\0" * 7)
    before = (run / "metrics.jsonl").read_text()
    done = train(run, "--config.train.steps=15", check=False)
    assert done.returncode != 0
    assert "cannot be restored" in done.stderr and "Move it aside" in done.stderr
    assert "Traceback" not in done.stderr
    assert (run / "metrics.jsonl").read_text() == before and latest.exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--config.train.stpes=5"], 'Did you mean "steps"'),
        (["--config.model.dtype=int8"], "model.dtype"),
        (["--config.l2a.mode=sometimes"], "l2a.mode 'sometimes' is unknown"),
        (["--config.model.checkpoint=/some/qwen"], "only read with model.init='checkpoint'"),
        (
            ["--config.model.init=checkpoint", "--config.model.checkpoint=/nonexistent/qwen"],
            "/nonexistent/qwen does not exist",
        ),
        (["--config.data.tokenizer=/nonexistent/tok"], "neither 'bytes', 'qwen' nor a local"),
        (["--config.train.steps=1"], "train.steps: 1 must exceed train.warmup_steps"),
    ],
)
def test_bad_configs_fail_at_start_with_the_field_named(tmp_path, args, match):
    done = train(tmp_path / "run", *args, check=False)
    assert done.returncode != 0
    assert match in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_batch_the_mesh_cannot_split_is_refused(tmp_path):
    args = ["--config.data.batch_size=3", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2"]  # fmt: skip
    run_env = {**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(command(tmp_path, *args), env=run_env, capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "data.batch_size: 3 rows do not split over the mesh's 4" in done.stderr


def test_unwritable_workdir_and_changed_settings(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable"):
        from l2a_jax.training.loop import _prepare_workdir

        _prepare_workdir(blocker / "run", default_config())
    _prepare_workdir(tmp_path / "run", default_config())
    changed = default_config()
    changed.model.hidden_size = 512
    with pytest.raises(ConfigError, match=r"other settings \(model.hidden_size\)"):
        _prepare_workdir(tmp_path / "run", changed)


def test_validate_names_the_field():
    config = default_config()
    config.unlock()
    config.train.stpes = 3
    with pytest.raises(
        ConfigError, match="unknown config key train.stpes; did you mean train.steps"
    ):
        validate(config, 257)
    config = default_config()
    config.model.init = "random"
    config.model.vocab_size = 100
    with pytest.raises(ConfigError, match="model.vocab_size: 100 is smaller than the tokenizer"):
        validate(config, 257)


def test_a_route_all_hand_off_as_long_as_the_run_is_warned_about():
    """Routing every token (then a falling share) for as many steps as the run has is legal,
    for smoke runs, but gets a warning; a hand-off that ends before the last step does not."""
    import warnings

    def check(steps, route_all, decay):
        config = default_config()
        config.model.init = "random"
        config.train.steps = steps
        config.train.route_all_steps = route_all
        config.train.route_all_decay_steps = decay
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validate(config, 257)
        return [w for w in caught if "route_all" in str(w.message)]

    (warned,) = check(200, 150, 50)
    assert "train.steps (200)" in str(warned.message)
    assert check(200, 150, 49) == []
    assert check(200, 0, 0) == []


@pytest.mark.slow
def test_recipe_config_trains_a_local_hf_checkpoint(tmp_path):
    """configs/qwen3_128k.py on a tiny random Qwen3, at a short length: context extended,
    every layer L2A, only attention, norms and routers move."""
    import numpy as np
    import torch
    from hf_models import build_hf_model, save_hf_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from l2a_jax import from_hf

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    ))  # fmt: skip
    checkpoint = save_hf_model(hf, tmp_path / "hf")

    def recipe(checkpoint, workdir):
        return subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "--config",
             str(ROOT / "configs/qwen3_128k.py"), "--workdir", str(workdir),
             f"--config.model.checkpoint={checkpoint}", "--config.model.dtype=float32",
             "--config.data.tokenizer=bytes", "--config.data.seq_len=400",
             "--config.data.batch_size=2", "--config.train.steps=3",
             "--config.train.warmup_steps=1", "--config.train.sparsity_warmup_steps=1",
             "--config.train.learning_rate=1e-2", "--config.train.log_every=1"],
            env=env(), capture_output=True, text=True,
        )  # fmt: skip

    done = recipe(checkpoint, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    trained = from_hf(tmp_path / "run" / "model", attention_impl="xla")
    base = from_hf(checkpoint, attention_impl="xla")
    assert trained.cfg.max_position_embeddings == 131072 and trained.cfg.rope.theta == 5e6
    assert trained.l2a.window == 4095 and trained.l2a_layers == (0, 1)
    layer, base_layer = trained.layers[0], base.layers[0]
    np.testing.assert_array_equal(layer.mlp.w_up[...], base_layer.mlp.w_up[...])
    np.testing.assert_array_equal(trained.embed[...], base.embed[...])
    assert not np.array_equal(layer.attn.wq[...], base_layer.attn.wq[...])

    # a checkpoint whose vocabulary cannot hold the tokenizer's ids is refused at start
    small = save_hf_model(build_hf_model("qwen3_bias_yarn_factor"), tmp_path / "small")
    done = recipe(small, tmp_path / "run2")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "tokenizer's vocabulary (257) does not fit the model's (101)" in done.stderr


@pytest.mark.slow
def test_eight_simulated_devices_give_the_losses_of_one(tmp_path):
    mesh_env = {**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    sharded = [
        "--config.data.batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.train.steps=4",
    ]  # fmt: skip
    single = ["--config.data.batch_size=4", "--config.train.steps=4"]
    for workdir, args, run_env in (
        (tmp_path / "eight", sharded, mesh_env),
        (tmp_path / "one", single, env()),
    ):
        done = subprocess.run(command(workdir, *args), env=run_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    eight, one = read_metrics(tmp_path / "eight"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in eight] == [1, 2, 3, 4]
    for got, want in zip(eight, one, strict=True):
        for key in ("loss", "cross_entropy", "routed_fraction", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_two_processes_train_resume_and_export_together(tmp_path):
    """Two local processes (4 simulated devices each, one 8-device mesh): each reads its own
    share of the data, process 0 alone writes logs and the model, and a run stopped at step 6
    and resumed logs the losses of one that ran through."""
    import portpicker

    def launch(workdir, kill_after_checkpoint=None):
        port = portpicker.pick_unused_port()
        args = [
            "--config.data.batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.train.steps=9",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        ]  # fmt: skip
        run_env = {**env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs = [
            subprocess.Popen(
                command(workdir, *args, f"--process_id={i}"),
                env=run_env,
                text=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for i in range(2)
        ]
        if kill_after_checkpoint is not None:
            done = workdir / "checkpoints" / str(kill_after_checkpoint) / "commit_success.txt"
            deadline = time.monotonic() + 300
            while not done.exists():
                assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
                time.sleep(0.01)
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if kill_after_checkpoint is None:
                assert proc.returncode == 0, err[-3000:]

    launch(tmp_path / "through")
    launch(tmp_path / "resumed", kill_after_checkpoint=6)
    data_files = {p.name for p in (tmp_path / "resumed/checkpoints/6/data").iterdir()}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files
    assert not (tmp_path / "resumed" / "model").exists()
    launch(tmp_path / "resumed")
    records = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in records] == list(range(1, 10))  # written once, by process 0
    assert losses(tmp_path / "resumed") == losses(tmp_path / "through")
    assert all(math.isfinite(r["loss"]) for r in records)
    from l2a_jax import from_hf

    assert from_hf(tmp_path / "resumed" / "model", attention_impl="xla").l2a is not None
