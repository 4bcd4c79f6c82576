"""Training and inference throughput of the ResNet-18 classifier: airysort (JAX/Flax NNX)
against the same architecture in PyTorch, in the same run.

    .venv/bin/python benchmarks/cnn.py                 # 128×128, width 64, batch 32
    .venv/bin/python benchmarks/cnn.py --width 32 --steps 5

Both sides build the same pre-activation ResNet-18 for one-channel 128×128 images
with 11 outputs (input normalisation, 7×7 stride-2 stem, BN + ReLU, 3×3 max pool,
four stages of two pre-activation blocks, final BN + ReLU, global average pool,
linear layer) and measure, after warm-up (JIT compilation on the JAX side):

- train: one optimiser step (forward, sigmoid BCE, backward, AdamW) per batch,
- infer: a forward pass in eval mode per batch (twice the training batch),

in interleaved rounds (best round of each kept, fair on a shared machine), as images/s, with the ratio airysort / PyTorch.
The JAX side runs as ``airysort train`` does (``jaxmodels.parallel.use_every_cpu_core``):
on a CPU, XLA's own convolution kernels on one device, or one device per core where the
installed XLA lacks them; each batch is sharded over all devices. PyTorch uses one
thread per core. Like the ``airysort`` command, the script first restarts itself with
glibc's huge-page tunable (:mod:`pipeline.allocator`), which then applies to both sides.
PyTorch is not a dependency of airysort: install it only for this benchmark
(``pip install torch==2.13.0``); without it the PyTorch column is skipped with a message. On a GPU both sides run there (the
card is named in the table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

# Benchmark the source tree this script belongs to, whatever copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_CLASSES = 11


def timed(step, n_steps: int) -> float:
    """Seconds per call of ``step`` (which must block until its work is done)."""
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - start) / n_steps


# ------------------------------------------------------------------------------ JAX


def bench_jax(*, size: int, width: int, batch: int) -> dict:
    """Build the airysort model and return compiled ``train``/``infer`` step closures."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxmodels.checkpoint import init_model
    from jaxmodels.infer import _probabilities
    from jaxmodels.losses import weighted_bce
    from jaxmodels.parallel import make_data_mesh, replicate, shard_batch
    from jaxmodels.resnet import ResNet18
    from jaxmodels.train import _train_step

    # As in training: the batch sharded over every device (jaxmodels.parallel.use_every_cpu_core),
    # the state replicated.
    mesh = make_data_mesh()
    model = init_model(lambda: ResNet18(width=width, log_activation=False, rngs=nnx.Rngs(0)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-4), wrt=nnx.Param)
    nnx.update(model, replicate(nnx.state(model), mesh))
    nnx.update(optimizer, replicate(nnx.state(optimizer), mesh))
    rng = np.random.default_rng(0)
    host_x = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
    batch_arrays = shard_batch(
        {"x": host_x, "y": rng.integers(0, 2, (batch, N_CLASSES)).astype(np.float32)}, mesh)
    x_infer = shard_batch({"x": np.concatenate([host_x, host_x])}, mesh)["x"]

    def loss_fn(model, batch, *, key, step, train):
        return weighted_bce(model(batch["x"]), batch["y"]), {}

    # The same jitted step and the same cached graph walk as jaxmodels.train.fit and
    # jaxmodels.infer.predict_proba.
    model.train()
    train_step = nnx.cached_partial(_train_step(loss_fn), model, optimizer)
    model.eval()
    probabilities_of = nnx.cached_partial(_probabilities, model)
    key, step = jax.random.key(0), jnp.zeros((), jnp.int32)

    def train():
        train_step(batch_arrays, key, step)[0].block_until_ready()

    def infer():
        probabilities_of(x_infer).block_until_ready()

    start = time.perf_counter()
    train()
    infer()  # compile both programs before timing
    return {"device": f"{jax.devices()[0].device_kind} x {mesh.size}", "train": train, "infer": infer,
            "compile": time.perf_counter() - start}


# -------------------------------------------------------------------------- PyTorch


def torch_resnet18(width: int):
    import torch
    from torch import nn

    class PreActBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(c_in, momentum=0.1)
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out, momentum=0.1)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                             if stride != 1 or c_in != c_out else None)

        def forward(self, x):
            out = torch.relu(self.bn1(x))
            residual = x if self.shortcut is None else self.shortcut(out)
            out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
            return out + residual

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_norm = nn.BatchNorm2d(1, affine=False)
            self.stem = nn.Conv2d(1, width, 7, 2, 3, bias=False)
            self.stem_bn = nn.BatchNorm2d(width)
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks, c_in = [], width
            for stage in range(4):
                c_out = width * 2**stage
                for b in range(2):
                    blocks.append(PreActBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1))
                    c_in = c_out
            self.blocks = nn.Sequential(*blocks)
            self.final_bn = nn.BatchNorm2d(c_in)
            self.classifier = nn.Linear(c_in, N_CLASSES)

        def forward(self, x):
            x = self.pool(torch.relu(self.stem_bn(self.stem(self.input_norm(x)))))
            x = torch.relu(self.final_bn(self.blocks(x)))
            return self.classifier(x.mean(dim=(2, 3)))

    return ResNet18()


def bench_torch(*, size: int, width: int, batch: int) -> dict | None:
    """The same for PyTorch; None (with a message) when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: skipping the PyTorch column "
              "(pip install torch==2.13.0 to compare)", file=sys.stderr)
        return None
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_resnet18(width).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(batch, 1, size, size)).astype(np.float32), device=device)
    y = torch.as_tensor(rng.integers(0, 2, (batch, N_CLASSES)).astype(np.float32), device=device)
    x_infer = torch.cat([x, x])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        sync()

    def infer_step():
        model.eval()
        with torch.inference_mode():
            torch.sigmoid(model(x_infer))
        sync()

    train_step()  # warm-up (allocator, oneDNN kernel selection)
    infer_step()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": name, "train": train_step, "infer": infer_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--batch", type=int, default=32, help="training batch (inference: 2x)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    args = parser.parse_args()
    options = dict(size=args.size, width=args.width, batch=args.batch)
    from jaxmodels.parallel import use_every_cpu_core
    from pipeline.allocator import restart_with_huge_pages

    # What the airysort command does first: both frameworks then run with huge pages
    # (GLIBC_TUNABLES=glibc.malloc.hugetlb=0 in the environment compares without them).
    restart_with_huge_pages()
    use_every_cpu_core()  # what airysort train does, before JAX starts

    jax_side = bench_jax(**options)
    torch_side = bench_torch(**options)
    # Interleave the two frameworks, round after round, and keep each one's best round:
    # on a shared machine a load spike then cannot favour either side.
    images = {"train": args.batch, "infer": 2 * args.batch}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for name, side in (("jax", jax_side), ("torch", torch_side)):
            if side is None:
                continue
            for key in ("train", "infer"):
                rate = images[key] / timed(side[key], args.steps)
                best[name, key] = max(best.get((name, key), 0.0), rate)
    jax_result = {"device": jax_side["device"], "compile": jax_side["compile"],
                  **{k: best["jax", k] for k in images}}
    torch_result = None if torch_side is None else {
        "device": torch_side["device"], **{k: best["torch", k] for k in images}}
    print(f"ResNet-18 (pre-activation, width {args.width}), {args.size}x{args.size} images, "
          f"batch {args.batch} (inference {2 * args.batch}), best of {args.rounds} rounds of "
          f"{args.steps} steps, "
          f"{os.cpu_count()} CPU cores")
    print(f"airysort device: {jax_result['device']}; JIT compilation {jax_result['compile']:.1f} s "
          "(once per run, not in the rates)")
    print(f"GLIBC_TUNABLES (both sides): {os.environ.get('GLIBC_TUNABLES', 'not set')}")
    header = f"{'':<22}{'airysort (JAX)':>16}"
    if torch_result is not None:
        header += f"{'PyTorch':>12}{'ratio':>8}"
        print(f"PyTorch device: {torch_result['device']}")
    print(header)
    for key, label in (("train", "train images/s"), ("infer", "inference images/s")):
        row = f"{label:<22}{jax_result[key]:>16.1f}"
        if torch_result is not None:
            row += f"{torch_result[key]:>12.1f}{jax_result[key] / torch_result[key]:>8.2f}"
        print(row)
    if torch_result is not None:
        print("ratio = airysort / PyTorch (>= 1: airysort at least as fast)")


if __name__ == "__main__":
    main()
