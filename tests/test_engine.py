"""The one meta-training engine: gradients reach every φ through the trainer's own path,
checkpoints with core statistics load in LearnedOptimizer, state in equals state out."""

from __future__ import annotations

import pytest
import torch

from selfref import checkpoints
from selfref.meta import LearnedOptimizerProblem, MetaTrainConfig, MetaTrainer, init_state
from selfref.meta.trainer import train_step
from selfref.net import AnalyzerConfig, SelfReferentialNet
from selfref.net.cores import core_names
from selfref.tasks import make

D64 = torch.float64

# (core, analyzer options): every registered core, and the SRWM with the analyzer reading
# the core's own statistics (AnalyzerConfig(core_stats=4)) instead of the core itself
CASES = [(c, {}) for c in core_names()] + [("srwm", {"core_stats": 4})]


def _net(core: str, analyzer: dict) -> SelfReferentialNet:
    task = make("quadratic", dtype=D64)
    return SelfReferentialNet.from_task(task, core=core, analyzer=AnalyzerConfig(**analyzer))


@pytest.mark.parametrize(("core", "analyzer"), CASES)
def test_every_meta_parameter_gets_a_gradient_through_the_trainers_path(core, analyzer):
    """init_state -> train_step builds the inner state the way training does (from a
    detached φ); the meta-gradient must still reach every φ tensor, SRWM's W_0 included."""
    net = _net(core, analyzer)
    cfg = MetaTrainConfig(meta_batch=3, unroll=4, inner_steps=8, clip_grad_norm=0.0)
    problem = LearnedOptimizerProblem(net, eval_tasks=2, eval_steps=2)
    est = cfg.make_estimator()
    state = init_state(problem, est, cfg)
    gen = torch.Generator().manual_seed(0)
    e = est.estimate(problem, state["meta_params"], state["estimator"], gen, 8, 0)
    zero = [k for k, g in e.grads.items() if not bool(g.abs().sum() > 0)]
    assert not zero, f"{core}: no meta-gradient reaches {zero}"
    new, metrics = train_step(problem, est, cfg, state)
    assert new["step"] == 1 and state["step"] == 0  # the input state is not modified
    moved = [
        k
        for k in state["meta_params"]
        if torch.equal(new["meta_params"][k], state["meta_params"][k])
    ]
    assert not moved, f"{core}: Adam left {moved} unchanged"


def test_learned_optimizer_runs_a_checkpoint_with_core_statistics(tmp_path):
    """A checkpoint meta-trained with AnalyzerConfig(core_stats=4) loads, and its first
    update equals the network's own step on the same weights and gradient."""
    net = _net("srwm", {"core_stats": 4})
    cfg = MetaTrainConfig(meta_steps=2, meta_batch=2, unroll=2, inner_steps=4, eval_tasks=2)
    tr = MetaTrainer(net, cfg)
    tr.train()
    path = tr.export(tmp_path / "srwm.pt")
    from selfref.net.optimizer import LearnedOptimizer

    task = net.normal.task
    theta = task.init_params(torch.Generator().manual_seed(5))
    batch = task.batch("train", 0, 5)
    phi = checkpoints.meta_params_of(checkpoints.load_meta(path))
    want, _, _ = net.step(phi, theta, net.init_state(phi, theta), batch)
    p = torch.nn.Parameter(theta["theta"].clone())
    opt = LearnedOptimizer([p], checkpoint=path)
    loss = task.loss({"theta": p}, batch)
    loss.backward()
    opt.step()
    torch.testing.assert_close(p.detach(), want["theta"])


def test_sequence_problem_needs_a_learner():
    from selfref.meta import SequenceProblem
    from selfref.tasks.fewshot import FewShotDigits

    with pytest.raises(ValueError, match="with_model"):
        SequenceProblem(FewShotDigits(ways=2, length=4, batch_size=2, eval_sequences=2))
