"""Functional training vs the idiomatic torch.optim loop: speed, exactness, and does it learn.

Measured side by side in one run, on the same task, batches and initial weights:

- ``functional``: :func:`selfref.train.train` (``torch.func.grad_and_value`` + the pure
  optimizers of :mod:`selfref.optim`, one host sync per step for the loss curve);
- ``torch``: leaf tensors + ``loss.backward()`` + ``torch.optim.Adam`` (default
  implementation for the device), also reading the loss every step.

Repeats alternate the two loops and the median time is kept. Metrics: steps/s of each,
their time ratio (target: the functional loop costs at most 1.5x the torch.optim loop), the
max |Δθ| of every functional optimizer against torch.optim after 20 float64 steps on
digits-mlp (target <= 1e-10), and the test accuracy of the issue's acceptance run
(digits-mlp, Adam, lr 0.01, 200 steps; target >= 0.85).

Run: ``python -m benchmarks.functional_train [--quick] [--device cuda]``.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import base_parser, target, write_result
from selfref.optim import OPTIMIZERS, make_optimizer
from selfref.tasks import make, resolve_device
from selfref.train import train

NAME = "functional_train"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_loop(task, steps: int, seed: int, lr: float) -> list[float]:
    """The idiomatic loop: leaf tensors, backward(), torch.optim.Adam."""
    params = {
        k: v.clone().requires_grad_(True)
        for k, v in task.init_params(torch.Generator().manual_seed(seed)).items()
    }
    opt = torch.optim.Adam(params.values(), lr=lr)
    losses = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(params, task.batch("train", t, seed))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def time_pair(task, steps: int, repeats: int, lr: float) -> dict[str, float]:
    dev = task.device
    t_fun, t_ref = [], []
    for r in range(repeats):
        for which in ("functional", "torch") if r % 2 == 0 else ("torch", "functional"):
            _sync(dev)
            t0 = time.perf_counter()
            if which == "functional":
                train(task, "adam", {"lr": lr}, steps, seed=r)
            else:
                torch_loop(task, steps, seed=r, lr=lr)
            _sync(dev)
            (t_fun if which == "functional" else t_ref).append(time.perf_counter() - t0)
    f, t = statistics.median(t_fun), statistics.median(t_ref)
    return {
        "functional_steps_per_s": steps / f,
        "torch_steps_per_s": steps / t,
        "time_ratio": f / t,
    }


def exactness(device: torch.device, steps: int = 20) -> dict[str, float]:
    """max |θ_functional − θ_torch.optim| after ``steps`` float64 steps, per optimizer."""
    task = make("digits-mlp", dtype=torch.float64, device=device)
    out = {}
    for name in OPTIMIZERS:
        lr = {"sgd": 0.1, "momentum": 0.05, "nesterov": 0.05, "rmsprop": 0.01, "adam": 0.01}[name]
        hp: dict[str, float] = {"lr": lr, "weight_decay": 1e-3}
        p0 = task.init_params(torch.Generator().manual_seed(0))
        ref = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
        kw = {"lr": lr, "weight_decay": 1e-3}
        if name in ("momentum", "nesterov"):
            hp["momentum"] = 0.9
            torch_opt: torch.optim.Optimizer = torch.optim.SGD(
                ref.values(), momentum=0.9, nesterov=name == "nesterov", **kw
            )
        elif name == "sgd":
            torch_opt = torch.optim.SGD(ref.values(), **kw)
        elif name == "rmsprop":
            torch_opt = torch.optim.RMSprop(ref.values(), **kw)
        else:
            torch_opt = torch.optim.Adam(ref.values(), **kw)
        fopt = make_optimizer(name)
        params, state = dict(p0), fopt.init(p0)
        for t in range(steps):
            batch = task.batch("train", t, 0)
            torch_opt.zero_grad()
            task.loss(ref, batch).backward()
            torch_opt.step()
            params, state = fopt.update(
                params, torch.func.grad(task.loss)(params, batch), state, hp
            )
        out[f"max_abs_diff_{name}"] = max(
            float((params[k] - ref[k].detach()).abs().max()) for k in params
        )
    return out


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each loop")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1: the models are tiny, threads only add syncs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    steps = args.steps or (100 if args.quick else 1000)
    repeats = args.repeats or (3 if args.quick else 7)
    lr = 0.01

    task = make("digits-mlp", device=device)
    train(task, "adam", {"lr": lr}, 10, seed=0)  # warm-up (imports, kernels)
    torch_loop(task, 10, seed=0, lr=lr)
    speed = time_pair(task, steps, repeats, lr)
    exact = exactness(device)
    accept = train(task, "adam", {"lr": lr}, 200, seed=0)
    test_acc = task.evaluate(accept.params, "test")["accuracy"]

    metrics = {**speed, **exact, "digits_adam_200_test_accuracy": test_acc}
    targets = {
        "time_ratio": target(speed["time_ratio"], "<= 1.5"),
        "digits_adam_200_test_accuracy": target(test_acc, ">= 0.85"),
        **{k: target(v, "<= 1e-10") for k, v in exact.items()},
    }
    config = {
        "task": "digits-mlp",
        "optimizer": "adam",
        "lr": lr,
        "steps": steps,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    out = args.out or (f"benchmarks/results/{NAME}.quick.json" if args.quick else None)
    write_result(NAME, config, metrics, targets, out=out)


if __name__ == "__main__":
    main()
