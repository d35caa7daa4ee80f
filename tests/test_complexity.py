"""Tests of selfref.methods.complexity (Grebenkova et al. 2021) and ``selfref complexity``.

The KL term, the reparameterized sampling and the SNR pruning mask are checked against
direct computations; the pivot hypernetwork against its closed form; training against its
budget and its purpose (a larger λ gives a simpler posterior); the CLI against its files.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from selfref.budget import Budget, BudgetExceeded, CostCounter
from selfref.methods.complexity import (
    PRUNE_FRACTIONS,
    PRUNE_SCOPES,
    ComplexityConfig,
    PivotHypernet,
    apply_mask,
    kl_to_standard_normal,
    pruning_curve,
    sample_log_uniform,
    sample_weights,
    snr_prune_mask,
    train_hypernet,
    train_separate,
)
from selfref.tasks import make


def _posterior(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.weight": (6, 4), "l0.bias": (6,), "l1.weight": (3, 6), "l1.bias": (3,)}
    mu = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    ls = {k: torch.randn(s, generator=g, dtype=torch.float64) * 0.5 - 1 for k, s in shapes.items()}
    return mu, ls


def test_kl_matches_torch_distributions() -> None:
    mu, ls = _posterior()
    direct = sum(kl_divergence(Normal(mu[k], ls[k].exp()), Normal(0.0, 1.0)).sum() for k in mu)
    torch.testing.assert_close(kl_to_standard_normal(mu, ls), direct)
    zero = {k: torch.zeros_like(v) for k, v in mu.items()}
    assert float(kl_to_standard_normal(zero, zero)) == 0.0  # q = prior


def test_reparameterized_sample_matches_direct_and_its_gradients() -> None:
    mu, ls = _posterior()
    w = sample_weights(mu, ls, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for k in mu:  # same generator stream, dict order
        eps = torch.randn(mu[k].shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(w[k], mu[k] + ls[k].exp() * eps)
    # gradients: ∂w/∂μ = 1, ∂w/∂log σ = σ ε
    m = mu["l0.weight"].clone().requires_grad_(True)
    s = ls["l0.weight"].clone().requires_grad_(True)
    g = torch.Generator().manual_seed(9)
    out = sample_weights({"a": m}, {"a": s}, g)["a"]
    gm, gs = torch.autograd.grad(out.sum(), (m, s))
    eps = torch.randn(m.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(gm, torch.ones_like(gm))
    torch.testing.assert_close(gs, s.detach().exp() * eps)
    # moments over many draws: mean μ, std σ
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [sample_weights({"a": m.detach()}, {"a": s.detach()}, g)["a"] for _ in range(4000)]
    )
    sigma = s.detach().exp()
    assert ((draws.mean(0) - m.detach()).abs() < 5 * sigma / math.sqrt(4000)).all()
    assert ((draws.std(0) / sigma - 1).abs() < 0.1).all()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9])
def test_snr_prune_mask_matches_direct_ranking(fraction: float) -> None:
    mu, ls = _posterior(3)
    masks = snr_prune_mask(mu, ls, fraction)
    names = ["l0.weight", "l1.weight"]
    snr = np.concatenate([(mu[k].numpy() ** 2 / np.exp(2 * ls[k].numpy())).ravel() for k in names])
    n_prune = int(math.floor(fraction * snr.size + 1e-9))
    expected_pruned = set(np.argsort(snr, kind="stable")[:n_prune].tolist())
    keep = np.concatenate([masks[k].numpy().ravel() for k in names])
    assert set(np.flatnonzero(~keep).tolist()) == expected_pruned
    assert masks["l0.bias"].all() and masks["l1.bias"].all()  # biases kept
    if n_prune:  # every pruned weight has SNR <= every kept weight
        assert snr[~keep].max() <= snr[keep].min()
    pruned = apply_mask(mu, masks)
    for k in mu:
        torch.testing.assert_close(pruned[k], mu[k] * masks[k])
    with pytest.raises(ValueError, match="prune fraction"):
        snr_prune_mask(mu, ls, 1.0)


def _reference_delete(snr_by_layer: dict[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
    """Grebenkova et al.'s per-layer pruning at step j of ``delete_10`` (VarHyperNet,
    code/src/mnist_utils.py), restated: per layer, prune SNR <= sorted[round(j/10 · n)]."""
    out = {}
    for k, snr in snr_by_layer.items():
        ordered = np.sort(snr.flatten())
        out[k] = snr <= ordered[round(j / 10 * len(ordered))]
    return out


@pytest.mark.parametrize("j", range(10))
def test_layer_prune_mask_matches_the_authors_per_layer_rule(j: int) -> None:
    mu, ls = _posterior(4)
    names = ["l0.weight", "l1.weight"]
    snr = {k: mu[k].numpy() ** 2 / np.exp(2 * ls[k].numpy()) for k in names}
    masks = snr_prune_mask(mu, ls, PRUNE_FRACTIONS[j], scope="layer")
    expected = _reference_delete(snr, j)
    for k in names:
        np.testing.assert_array_equal(~masks[k].numpy(), expected[k])
        n = snr[k].size  # distinct SNRs: round(q·n) + 1 pruned, the lowest of the layer
        assert int((~masks[k]).sum()) == round(j / 10 * n) + 1
        assert snr[k][~masks[k].numpy()].max() < snr[k][masks[k].numpy()].min()
    assert masks["l0.bias"].all() and masks["l1.bias"].all()
    with pytest.raises(ValueError, match="prune scope 'row'.*global, layer"):
        snr_prune_mask(mu, ls, 0.5, scope="row")


def test_layer_scope_keeps_a_share_of_every_layer_where_global_empties_one() -> None:
    # l1's weights all have lower SNR than l0's: a global ranking at 50% (of 24 + 18 = 42
    # weights, 21 pruned) removes all 18 of l1 and 3 of l0; per layer each loses about half.
    mu, ls = _posterior(5)
    mu["l1.weight"] = mu["l1.weight"].sign() * 1e-3
    glob = snr_prune_mask(mu, ls, 0.5, scope="global")
    layer = snr_prune_mask(mu, ls, 0.5, scope="layer")
    assert not glob["l1.weight"].any() and int((~glob["l0.weight"]).sum()) == 3
    assert int((~layer["l0.weight"]).sum()) == 13 and int((~layer["l1.weight"]).sum()) == 10
    assert set(PRUNE_SCOPES) == {"global", "layer"}


def test_pivot_hypernet_interpolates() -> None:
    cfg = ComplexityConfig(family="piecewise", pivots=4, lam_low=1e-3, lam_high=1e2)
    assert float(cfg.normalize(1e-3)) == pytest.approx(0.0)
    assert float(cfg.normalize(1e2)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    shapes = (("l0.weight", (2, 3)),)
    hnet = PivotHypernet(cfg, shapes)
    phi = {
        "mu.l0.weight": torch.randn(4, 2, 3, generator=g, dtype=torch.float64),
        "log_sigma.l0.weight": torch.randn(4, 2, 3, generator=g, dtype=torch.float64),
    }
    for k in range(4):  # at pivot t_k the output is pivot k's tensors
        lam = math.exp(math.log(1e-3) + k / 3 * (math.log(1e2) - math.log(1e-3)))
        mu, ls = hnet(phi, lam)
        torch.testing.assert_close(mu["l0.weight"], phi["mu.l0.weight"][k])
        torch.testing.assert_close(ls["l0.weight"], phi["log_sigma.l0.weight"][k])
    for lam in sample_log_uniform(20, 1e-3, 1e2, g):
        c = hnet.coefficients(lam)
        assert float(c.sum()) == pytest.approx(1.0) and int((c > 0).sum()) <= 2
    # linear family: (1 - t)·μ₀ + t·μ₁
    lin = PivotHypernet(ComplexityConfig(family="linear"), shapes)
    phi2 = {k: v[:2] for k, v in phi.items()}
    mu, _ = lin(phi2, 1.0)
    t = float(ComplexityConfig().normalize(1.0))
    torch.testing.assert_close(
        mu["l0.weight"], (1 - t) * phi["mu.l0.weight"][0] + t * phi["mu.l0.weight"][1]
    )


def test_log_uniform_draws_cover_the_range() -> None:
    lam = sample_log_uniform(5000, 1e-3, 1e2, torch.Generator().manual_seed(0))
    assert float(lam.min()) >= 1e-3 and float(lam.max()) <= 1e2
    logs = torch.log10(lam)
    hist = torch.histc(logs, bins=5, min=-3, max=2)
    assert (hist / 5000 - 0.2).abs().max() < 0.03  # uniform in log λ


@pytest.mark.slow
def test_training_cost_and_complexity_control() -> None:
    task = make("digits-mlp", hidden=(8,))
    cfg = ComplexityConfig(lr=0.03)
    counter = CostCounter(Budget(grad_evals=5 * 200))
    hyper = train_hypernet(task, cfg, 200, seed=0, counter=counter)
    assert hyper.status == "ok"
    assert hyper.grad_evals == counter.grad_evals == 1000  # S = 5 draws per minibatch
    assert np.mean(hyper.losses[-10:]) < np.mean(hyper.losses[:10])
    kl_lo = float(kl_to_standard_normal(*hyper.posterior(1e-3)))
    kl_hi = float(kl_to_standard_normal(*hyper.posterior(1e2)))
    assert kl_hi < 0.2 * kl_lo  # a larger complexity weight gives a simpler posterior
    acc = pruning_curve(task, hyper, 1e-2, split="val")
    assert len(acc) == len(PRUNE_FRACTIONS) and acc[0] > 0.5
    mu, _ = hyper.posterior(1e-2)  # 0% of a global ranking is the unpruned mean network
    assert acc[0] == task.evaluate(mu, "val")["accuracy"]
    acc_layer = pruning_curve(task, hyper, 1e-2, split="val", scope="layer")
    assert len(acc_layer) == len(PRUNE_FRACTIONS) and acc_layer[0] > 0.5
    with pytest.raises(BudgetExceeded):  # never overspends
        train_hypernet(task, cfg, 3, seed=0, counter=CostCounter(Budget(grad_evals=14)))
    sep = train_separate(task, 0.1, 30, seed=0, config=cfg)
    assert sep.grad_evals == 30 and sep.fixed_lam == 0.1
    mu_a, _ = sep.posterior()
    mu_b, _ = sep.posterior(100.0)  # a separate network ignores λ
    torch.testing.assert_close(mu_a, mu_b)
    again = train_separate(task, 0.1, 30, seed=0, config=cfg)  # deterministic
    torch.testing.assert_close(again.phi, sep.phi)


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="family 'cubic'.*linear, piecewise, constant"):
        ComplexityConfig(family="cubic")
    with pytest.raises(ValueError, match="lam_low"):
        ComplexityConfig(lam_low=10.0, lam_high=1.0)
    with pytest.raises(ValueError, match="fixed λ"):
        train_hypernet(make("digits-logreg"), ComplexityConfig(family="constant"), 2)
    with pytest.raises(ValueError, match="supervised task"):
        train_hypernet(make("quadratic"), ComplexityConfig(), 2)


def test_cli_complexity_writes_run_dir(run_cli, tmp_logdir) -> None:
    r = run_cli(
        "complexity",
        "--task",
        "digits-mlp",
        "--hidden",
        "8",
        "--steps",
        "6",
        "--lambdas",
        "0.01",
        "10",
        "--logdir",
        tmp_logdir,
        "--device",
        "cpu",
    )
    assert r.code == 0, r.err
    assert "| 0.01 | hypernet |" in r.out and "tensorboard --logdir" in r.out
    (run,) = list((tmp_logdir / "complexity").iterdir())
    for name in (
        "config.json",
        "argv.txt",
        "results.json",
        "results.md",
        "accuracy_vs_pruning.png",
    ):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    res = json.loads((run / "results.json").read_text())
    assert res["separate"]["grad_evals"] == 12
    assert res["hypernet"]["grad_evals"] == 5 * max(1, 12 // 15)
    assert set(res["accuracy"]["hypernet"]) == {"0.01", "10"}
    assert len(res["accuracy"]["separate"]["10"]) == 10


def test_cli_complexity_bad_input_is_one_line(run_cli, tmp_logdir) -> None:
    r = run_cli("complexity", "--task", "quadratic", "--logdir", tmp_logdir)
    assert r.code == 2
    assert len(r.err_lines) == 1 and "digits-mlp" in r.err_lines[0]
    r = run_cli("complexity", "--task", "mnist-mlp", "--logdir", tmp_logdir)
    assert r.code == 2 and "--data-dir" in r.err_lines[0]
    r = run_cli("complexity", "--lambdas", "0", "--logdir", tmp_logdir)
    assert r.code == 2


def test_cli_complexity_prune_scope_layer(run_cli, tmp_logdir) -> None:
    common = ("complexity", "--hidden", "8", "--steps", "6", "--lambdas", "0.1")
    r = run_cli(*common, "--prune-scope", "layer", "--logdir", tmp_logdir, "--device", "cpu")
    assert r.code == 0, r.err
    assert "layer SNR ranking" in r.out
    (run,) = list((tmp_logdir / "complexity").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert res["prune_scope"] == "layer"
    assert json.loads((run / "config.json").read_text())["prune_scope"] == "layer"
    r = run_cli(*common, "--prune-scope", "row", "--logdir", tmp_logdir)
    assert r.code == 2 and "global" in r.err
