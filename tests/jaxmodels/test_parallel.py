"""Data parallelism: a 4-device CPU mesh gives the same training as one device."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax

from jaxmodels import parallel
from tests.factories import repo_env, xla_flags

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from flax import nnx
    from jaxmodels.checkpoint import init_model
    from jaxmodels.configs import TrainConfig
    from jaxmodels.data import PatternBatches
    from jaxmodels.parallel import make_data_mesh, shard_batch
    from jaxmodels.resnet import _ResNetTiny
    from jaxmodels.train import fit
    from tests.jaxmodels.test_train import ring_loss
    from tests.jaxmodels._synthetic import ring_images

    images, labels = ring_images(96, size=32, seed=0)
    batches = PatternBatches(images, np.arange(96), batch_size=32, extras={"y": labels},
                             shuffle=True, chunk=64, seed=0)
    config = TrainConfig(epochs=1, learning_rate=3e-3, validation_fraction=0.0, log_every=1)
    out = {"devices": jax.device_count()}
    for n in (1, 4):
        mesh = make_data_mesh(jax.devices()[:n])
        sharded = shard_batch(next(iter(batches.epoch(0))), mesh)["x"]
        lines = []
        result = fit(init_model(lambda: _ResNetTiny(n_classes=2, rngs=nnx.Rngs(0))), ring_loss, batches,
                     config=config, mesh=mesh, log=lines.append)
        params = jax.tree.leaves(jax.device_get(nnx.state(result.model, nnx.Param)))
        kernel = result.model.classifier.kernel[...]
        out[n] = {"loss": result.history[0]["train_loss"], "steps": result.steps,
                  "params": [p.ravel().tolist() for p in params],
                  "batch_devices": len(sharded.sharding.device_set),
                  "shard_rows": sharded.addressable_shards[0].data.shape[0],
                  "param_devices": len(kernel.sharding.device_set),
                  "param_replicated": kernel.sharding.is_fully_replicated}
    print(json.dumps(out))
    """
)


def test_four_cpu_devices_train_like_one():
    env = repo_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert out["devices"] == 4
    assert (one["batch_devices"], one["shard_rows"]) == (1, 32)
    assert (four["batch_devices"], four["shard_rows"]) == (4, 8)
    assert four["param_devices"] == 4 and four["param_replicated"]
    assert one["steps"] == four["steps"] == 3
    assert abs(one["loss"] - four["loss"]) < 1e-5 * max(1.0, abs(one["loss"]))
    import numpy as np

    for a, b in zip(one["params"], four["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mesh_and_batch_rounding():
    mesh = parallel.make_data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert parallel.round_batch_size(1, mesh) == mesh.size
    assert parallel.round_batch_size(10, mesh) % mesh.size == 0


def test_distributed_initialisation_only_under_multi_task_slurm(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in SRUN_STEP:
        monkeypatch.delenv(name, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    # salloc -n 4 or an sbatch script without srun: no job step, so this process trains
    # alone and says so (JAX would fail looking for the step's nodes).
    assert parallel.maybe_initialize_distributed() is False
    assert "not started by srun" in capsys.readouterr().err
    for name, value in SRUN_STEP.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel.maybe_initialize_distributed() is True
    assert calls == [1]


#: What ``srun`` sets for each task of a job step (JAX's SLURM detection reads these).
SRUN_STEP = {"SLURM_JOB_ID": "123", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


CORES_SCRIPT = textwrap.dedent(
    """
    import json, os
    from jaxmodels.parallel import use_cpu_cores_as_devices
    n = use_cpu_cores_as_devices(max_devices=3)
    import jax
    again = use_cpu_cores_as_devices()  # backends now started: too late, nothing changes
    print(json.dumps({"set": n, "again": again, "devices": jax.device_count(),
                      "cores": len(os.sched_getaffinity(0))}))
    """
)


def _run_script(script: str, **env_overrides: str) -> dict:
    """Run ``script`` in a fresh CPU-only process (XLA_FLAGS and SLURM variables only as
    given) and return the JSON it prints last."""
    env = repo_env(JAX_PLATFORMS="cpu", **env_overrides)
    for name in ("XLA_FLAGS", *SRUN_STEP):
        if name not in env_overrides:
            env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _cores_run(**env_overrides: str) -> dict:
    return _run_script(CORES_SCRIPT, **env_overrides)


def test_cpu_cores_become_devices_before_jax_starts_and_never_against_the_user():
    out = _cores_run()
    expected = min(3, out["cores"])
    assert out["devices"] == expected
    assert out["set"] == (expected if expected > 1 else 0)
    assert out["again"] == 0
    # A device count the user chose wins; a task of a multi-task SLURM job is left alone.
    out = _cores_run(XLA_FLAGS="--xla_force_host_platform_device_count=5")
    assert (out["set"], out["devices"]) == (0, 5)
    out = _cores_run(**SRUN_STEP)
    assert (out["set"], out["devices"]) == (0, 1)


CONVOLUTIONS_SCRIPT = textwrap.dedent(
    """
    import json, os
    from jaxmodels.parallel import _xla_knows_flag, use_xla_cpu_convolutions
    chosen = use_xla_cpu_convolutions()
    import jax, jax.numpy as jnp
    again = use_xla_cpu_convolutions()  # backends now started: nothing changes, the flag is in effect
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # A stage-1 layer of the ResNet (smaller ones are not given to YNNPACK anyway).
    x, w = jax.ShapeDtypeStruct((8, 32, 32, 64), jnp.float32), jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    weight_gradient = jax.jit(lambda x, w, ct: jax.vjp(conv, x, w)[1](ct)[1])
    compiled = weight_gradient.lower(x, w, x).compile().as_text()
    print(json.dumps({"set": chosen, "again": again, "flags": os.environ.get("XLA_FLAGS", ""),
                      "ynn": "ynn" in compiled.lower(), "unknown": _xla_knows_flag("xla_cpu_no_such_flag_anywhere")}))
    """
)


def test_xla_convolutions_replace_ynnpack_before_jax_starts_unless_the_user_chose():
    out = _run_script(CONVOLUTIONS_SCRIPT)
    assert out["unknown"] is False  # an unknown flag is never set (XLA would abort)
    assert out["set"] is True and out["again"] is True
    assert parallel.XLA_CPU_CONVOLUTIONS_FLAG in out["flags"]
    assert out["ynn"] is False  # the weight gradient is compiled without a YNNPACK fusion
    # The user's own choice of the flag wins (here: YNNPACK convolutions, as by default).
    chosen = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    out = _run_script(CONVOLUTIONS_SCRIPT, XLA_FLAGS=chosen)
    assert out["set"] is False and out["flags"] == chosen and out["ynn"] is True


EVERY_CORE_SCRIPT = textwrap.dedent(
    """
    import json, os
    from jaxmodels.parallel import use_every_cpu_core
    how = use_every_cpu_core()
    import jax
    print(json.dumps({"how": how, "devices": jax.device_count(), "cores": len(os.sched_getaffinity(0))}))
    """
)


def test_every_cpu_core_works_through_xla_kernels_or_else_one_device_per_core():
    out = _run_script(EVERY_CORE_SCRIPT)
    assert (out["how"], out["devices"]) == ("xla kernels", 1)
    # With YNNPACK's convolutions (the user's choice here), one device per core instead.
    out = _run_script(EVERY_CORE_SCRIPT, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=individual_convolution")
    cores = min(8, out["cores"])
    assert out["how"] == ("one device per core" if cores > 1 else "") and out["devices"] == cores
