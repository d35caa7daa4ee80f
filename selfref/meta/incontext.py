"""Meta-training sequence learners by backpropagation through the sequence (in-context learning).

On ``fewshot-digits`` (:mod:`selfref.tasks.fewshot`) a sequence learner reads
``(P x_t, one-hot(y_{t−1}))`` and predicts y_t; its weights are meta-trained with Adam on the
cross-entropy summed over the positions of many sequences, the gradient taken by
backpropagation through the whole sequence. What it learns is a learning algorithm that
runs in its activations (LSTM, HyperLSTM) or in its self-modifying weights (SRWM).

Learners (functional: ``init_params(generator)``, ``forward(params, inputs, state=None) ->
(logits, state)``, ``internals(params, inputs) -> dict`` for logging):

- :class:`SRWMSequenceModel` — the few-shot model of Irie et al. 2022 (reference
  ``ConvSRWMModel`` without the convolutional stem): input projection, ``layers`` blocks of
  [SRWM layer, Transformer feed-forward block (pre-LayerNorm, ReLU, residual)], output layer.
- :class:`LSTMSequenceModel` — one LSTM layer and an output layer (the reference
  ``ConvLSTMModel`` without stem; Hochreiter et al. 2001's meta-learning LSTM).
- :class:`HyperLSTMSequenceModel` — the HyperLSTM of Ha, Dai, Le 2016 (section 3.2): a small
  LSTM reads (x_t, h_{t−1}) and emits embeddings z that a linear hypernetwork maps to
  per-gate scalings of the main LSTM's input and recurrent products and to its biases, so
  the main LSTM's weights change at every step.

Also here: :func:`meta_train_incontext` (the training loop, logging ``meta/loss``,
``meta/grad_norm``, ``val/acc@k`` and the SRWM internals: ``srwm/l<i>/dW/<M>`` per
sub-matrix, ``srwm/l<i>/beta/<M>`` histograms, ``srwm/l<i>/q_entropy``, ``k_entropy``), and
the baseline :func:`sgd_query_accuracy` / :func:`tune_sgd` — a linear classifier trained by
gradient descent on the same k examples, its learning rate (and step count) chosen on a grid
on held-in (train-split) sequences.

Notation: b – sequences, n – length, i – input size, d – model width, w – ways (classes),
g – gates (4), z – hyper-embedding size, p – projected features, k – examples seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as Fn
from einops import rearrange
from torch import Tensor

from selfref.logging import Logger
from selfref.net.cores.srwm import SRWMLayerConfig, srwm_init, srwm_layer, srwm_stats
from selfref.optim import check_lr_schedule, cosine_decay
from selfref.params import Params, tree_detach

__all__ = [
    "SRWMSequenceModel",
    "LSTMSequenceModel",
    "HyperLSTMSequenceModel",
    "SEQUENCE_MODELS",
    "CORE_TO_MODEL",
    "make_sequence_model",
    "InContextConfig",
    "InContextResult",
    "meta_train_incontext",
    "evaluate_query_accuracy",
    "sgd_query_accuracy",
    "tune_sgd",
    "SGDChoice",
    "sgd_eval",
    "sgd_hits",
    "paired_difference",
    "log_metrics",
]


def _uniform(generator: torch.Generator, fan_in: int, *shape: int) -> Tensor:
    """``nn.Linear``'s default init U(−1/√fan_in, 1/√fan_in), drawn from ``generator``."""
    return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)


def _linear(params: Params, name: str, x: Tensor) -> Tensor:
    out = x @ params[f"{name}.weight"].T
    if f"{name}.bias" in params:
        out = out + params[f"{name}.bias"]
    return out


# --------------------------------------------------------------------------------------
# Learners
# --------------------------------------------------------------------------------------


class SRWMSequenceModel:
    """Input projection → [SRWM layer, feed-forward block] × layers → output layer.

    Irie et al. 2022, section 4.1 and the reference ``ConvSRWMModel``: the SRWM layer is
    :func:`selfref.net.cores.srwm.srwm_layer` (output projection, LayerNorm residual, β per
    sub-matrix, softmax on q and k); the feed-forward block is ``h + W2 relu(W1 LN(h))``.

    Args:
        in_dim: input size i (projected features + ways).
        num_classes: w.
        dim: model width d (default 64).
        heads: SRWM heads (default 4, head dim d / heads).
        layers: number of [SRWM, FF] blocks (default 2).
        ff_dim: hidden size of the FF block (default 4·d).
        beta_init: mean of W^β's init (reference: 0).
        input_softmax: softmax over each head's input before the recurrence (the
            reference's ``use_input_softmax`` option; default off as there).
        fused: fused SRWM recurrence (default True; False runs the step-by-step reference).
        token_shift: an option beside the reference model (default off): the input
            projection also reads the previous step's input (zeros at t = 0), so the first
            layer sees x_{t−1} beside its label y_{t−1} — the "token shift" of RWKV-style
            models. The SRWM layers are unchanged.
    """

    name = "srwm"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff_dim: int | None = None,
        beta_init: float = 0.0,
        fused: bool = True,
        token_shift: bool = False,
        input_softmax: bool = False,
    ) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.in_dim, self.num_classes, self.dim, self.layers = in_dim, num_classes, dim, layers
        self.ff_dim = ff_dim or 4 * dim
        self.token_shift = token_shift
        self.proj_in = 2 * in_dim if token_shift else in_dim
        self.layer_config = SRWMLayerConfig(
            dim=dim, heads=heads, beta_init=beta_init, fused=fused, input_softmax=input_softmax
        )

    def init_params(self, generator: torch.Generator) -> Params:
        d, f = self.dim, self.ff_dim
        p: Params = {
            "in.weight": _uniform(generator, self.proj_in, d, self.proj_in),
            "in.bias": _uniform(generator, self.proj_in, d),
        }
        for i in range(self.layers):
            p.update(srwm_init(self.layer_config, generator, prefix=f"l{i}.srwm."))
            p[f"l{i}.ff.ln.weight"] = torch.ones(d)
            p[f"l{i}.ff.ln.bias"] = torch.zeros(d)
            p[f"l{i}.ff.1.weight"] = _uniform(generator, d, f, d)
            p[f"l{i}.ff.1.bias"] = _uniform(generator, d, f)
            p[f"l{i}.ff.2.weight"] = _uniform(generator, f, d, f)
            p[f"l{i}.ff.2.bias"] = _uniform(generator, f, d)
        p["out.weight"] = _uniform(generator, d, self.num_classes, d)
        p["out.bias"] = _uniform(generator, d, self.num_classes)
        return p

    def _run(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor], list[dict[str, Tensor]]]:
        new_state: dict[str, Tensor] = {}
        if self.token_shift:
            last = inputs.new_zeros(inputs[:, :1].shape) if state is None else state["last"]
            prev = torch.cat([last, inputs[:, :-1]], dim=1)  # (b, n, i): input at t − 1
            new_state["last"] = inputs[:, -1:]
            inputs = torch.cat([inputs, prev], dim=-1)  # (b, n, 2i)
        h = _linear(params, "in", inputs)  # (b, n, d)
        auxes = []
        for i in range(self.layers):
            sub = None
            if state is not None:
                sub = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"l{i}/")}
            h, st, aux = srwm_layer(params, h, self.layer_config, sub, prefix=f"l{i}.srwm.")
            new_state.update({f"l{i}/{k}": v for k, v in st.items()})
            auxes.append(aux)
            u = Fn.layer_norm(
                h, (self.dim,), params[f"l{i}.ff.ln.weight"], params[f"l{i}.ff.ln.bias"]
            )
            h = h + _linear(params, f"l{i}.ff.2", torch.relu(_linear(params, f"l{i}.ff.1", u)))
        return _linear(params, "out", h), new_state, auxes  # (b, n, w)

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (b, n, w); state = fast-weight shifts per layer (``l<i>/W_<M>``)."""
        logits, new_state, _ = self._run(params, inputs, state)
        return logits, new_state

    @torch.no_grad()
    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        """``l<i>/dW/<M>``, ``l<i>/q_entropy``, ``l<i>/k_entropy``, ``l<i>/beta/<M>`` ..."""
        _, _, auxes = self._run(params, inputs, None)
        out = {}
        for i, aux in enumerate(auxes):
            out.update({f"l{i}/{k}": v for k, v in srwm_stats(aux).items()})
        return out


def _lstm_scan(
    gates_x: Tensor, w_hh: Tensor, h: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM over precomputed input gates (b, n, 4d) (order i, f, g, o as torch's LSTM)."""
    hs = []
    for t in range(gates_x.shape[1]):
        g = gates_x[:, t] + h @ w_hh.T  # (b, 4d)
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs, dim=1), h, c  # (b, n, d)


class LSTMSequenceModel:
    """One LSTM layer (hidden ``dim``) and a linear output layer; torch's LSTM init.

    Args:
        in_dim: input size i. num_classes: w. dim: hidden size (default 128).
    """

    name = "lstm"

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128) -> None:
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim

    def init_params(self, generator: torch.Generator) -> Params:
        d = self.dim
        return {
            "lstm.w_ih": _uniform(generator, d, 4 * d, self.in_dim),
            "lstm.w_hh": _uniform(generator, d, 4 * d, d),
            "lstm.b": _uniform(generator, d, 4 * d) + _uniform(generator, d, 4 * d),
            "out.weight": _uniform(generator, d, self.num_classes, d),
            "out.bias": _uniform(generator, d, self.num_classes),
        }

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = inputs.shape[0]
        if state is None:
            state = {
                "h": inputs.new_zeros(b, self.dim),
                "c": inputs.new_zeros(b, self.dim),
            }
        gx = inputs @ params["lstm.w_ih"].T + params["lstm.b"]  # (b, n, 4d)
        hs, h, c = _lstm_scan(gx, params["lstm.w_hh"], state["h"], state["c"])
        return _linear(params, "out", hs), {"h": h, "c": c}

    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        return {}


class HyperLSTMSequenceModel:
    """HyperLSTM (Ha, Dai, Le 2016, section 3.2) and a linear output layer.

    The hyper-LSTM (hidden ``hyper_dim``) reads [x_t, h_{t−1}]; its output ĥ_t gives the
    embeddings z^h, z^x, z^b (``embed`` each, per gate); a linear hypernetwork maps them to
    d^h = 1 + W^{hz} z^h, d^x = 1 + W^{xz} z^x (per-unit scalings) and b = b_0 + W^{bz} z^b,
    and the main LSTM's gates are d^h ⊙ (W^h h_{t−1}) + d^x ⊙ (W^x x_t) + b. (The paper
    writes d = W z; the "1 +" keeps the main LSTM a plain LSTM at initialization, as its
    recommended init of W^{hz} to 0 and the z-bias to 1 does.)

    Args:
        in_dim: input size i. num_classes: w. dim: main hidden size (default 112).
        hyper_dim: hyper-LSTM hidden size (default 32). embed: z size per gate (default 4).
    """

    name = "hyperlstm"

    def __init__(
        self, in_dim: int, num_classes: int, dim: int = 112, hyper_dim: int = 32, embed: int = 4
    ) -> None:
        self.in_dim, self.num_classes = in_dim, num_classes
        self.dim, self.hyper_dim, self.embed = dim, hyper_dim, embed

    def init_params(self, generator: torch.Generator) -> Params:
        d, hd, z, i = self.dim, self.hyper_dim, self.embed, self.in_dim
        return {
            "hyper.w_ih": _uniform(generator, hd, 4 * hd, i + d),
            "hyper.w_hh": _uniform(generator, hd, 4 * hd, hd),
            "hyper.b": _uniform(generator, hd, 4 * hd),
            "z.weight": _uniform(generator, hd, 3 * 4 * z, hd),  # ĥ -> (z^h, z^x, z^b) per gate
            "z.bias": torch.zeros(3 * 4 * z),
            "d.h": torch.zeros(4, d, z),  # W^{hz}: z^h -> scaling of W^h h, per gate
            "d.x": torch.zeros(4, d, z),  # W^{xz}
            "d.b": torch.zeros(4, d, z),  # W^{bz}
            "main.w_ih": _uniform(generator, d, 4 * d, i),
            "main.w_hh": _uniform(generator, d, 4 * d, d),
            "main.b": _uniform(generator, d, 4 * d),
            "out.weight": _uniform(generator, d, self.num_classes, d),
            "out.bias": _uniform(generator, d, self.num_classes),
        }

    def _run(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        b, n, _ = inputs.shape
        d, hd = self.dim, self.hyper_dim
        if state is None:
            z0 = inputs.new_zeros
            state = {"h": z0(b, d), "c": z0(b, d), "hh": z0(b, hd), "hc": z0(b, hd)}
        h, c, hh, hc = state["h"], state["c"], state["hh"], state["hc"]
        wx = inputs @ params["main.w_ih"].T  # (b, n, 4d)
        hx = inputs @ params["hyper.w_ih"][:, : self.in_dim].T + params["hyper.b"]  # (b, n, 4hd)
        hs, scales = [], []
        for t in range(n):
            hg = (
                hx[:, t]
                + h @ params["hyper.w_ih"][:, self.in_dim :].T
                + hh @ params["hyper.w_hh"].T
            )
            hi, hf, hgg, ho = hg.chunk(4, dim=-1)
            hc = torch.sigmoid(hf) * hc + torch.sigmoid(hi) * torch.tanh(hgg)
            hh = torch.sigmoid(ho) * torch.tanh(hc)  # (b, hd)
            zs = rearrange(_linear(params, "z", hh), "b (s g z) -> s b g z", s=3, g=4)
            dh = 1 + torch.einsum("bgz,gdz->bgd", zs[0], params["d.h"])  # (b, 4, d)
            dx = 1 + torch.einsum("bgz,gdz->bgd", zs[1], params["d.x"])  # (b, 4, d)
            bias = torch.einsum("bgz,gdz->bgd", zs[2], params["d.b"])  # (b, 4, d)
            rec = rearrange(h @ params["main.w_hh"].T, "b (g d) -> b g d", g=4)
            inp = rearrange(wx[:, t], "b (g d) -> b g d", g=4)
            g = dh * rec + dx * inp + bias + rearrange(params["main.b"], "(g d) -> g d", g=4)
            i, f, gg, o = g.unbind(1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            scales.append(torch.stack([dh, dx]).detach())
        new_state = {"h": h, "c": c, "hh": hh, "hc": hc}
        return _linear(params, "out", torch.stack(hs, dim=1)), new_state, torch.stack(scales)

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, new_state, _ = self._run(params, inputs, state)
        return logits, new_state

    @torch.no_grad()
    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        """``hyper/scale_h``, ``hyper/scale_x`` (all d^h, d^x values, for histograms)."""
        _, _, scales = self._run(params, inputs, None)  # (n, 2, b, 4, d)
        return {
            "hyper/scale_h": scales[:, 0].reshape(-1),
            "hyper/scale_x": scales[:, 1].reshape(-1),
        }


SEQUENCE_MODELS: dict[str, type] = {
    "srwm": SRWMSequenceModel,
    "lstm": LSTMSequenceModel,
    "hyperlstm": HyperLSTMSequenceModel,
}

# `selfref meta-train --core <name>` on fewshot-digits: which sequence learner each core means
CORE_TO_MODEL: dict[str, str] = {"srwm": "srwm", "lstm": "lstm", "hypernet": "hyperlstm"}


def make_sequence_model(name: str, in_dim: int, num_classes: int, **options: Any) -> Any:
    """Build a sequence learner by name (a core name — ``hypernet`` — maps to its learner).

    Raises:
        ValueError: unknown name (listing the valid ones) or a bad option.
    """
    key = CORE_TO_MODEL.get(name, name)
    if key not in SEQUENCE_MODELS:
        valid = sorted(set(SEQUENCE_MODELS) | set(CORE_TO_MODEL))
        raise ValueError(f"unknown sequence model {name!r}; valid: {', '.join(valid)}")
    try:
        return SEQUENCE_MODELS[key](in_dim, num_classes, **options)
    except TypeError as e:
        raise ValueError(f"bad option for sequence model {name!r}: {e}") from e


# --------------------------------------------------------------------------------------
# Meta-training
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InContextConfig:
    """Meta-training of a sequence learner on fewshot-digits."""

    steps: int = 2000  # meta-training steps (one batch of sequences each)
    lr: float = 1e-3  # Adam learning rate (reference few-shot runs: 1e-3)
    grad_clip: float = 1.0  # global grad-norm clip (reference: 1.0)
    eval_every: int = 500  # steps between val evaluations (0: only at the end)
    log_every: int = 50  # steps between scalar logs of internals
    max_seconds: float = 0.0  # stop early after this much training time (0: no limit)
    lr_schedule: str = "constant"  # or "cosine": lr·cosine_decay(progress), see below
    keep_best: bool = False  # return the weights with the best val loss of the evaluations

    def __post_init__(self) -> None:
        check_lr_schedule(self.lr_schedule)
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best needs eval_every > 0 (it picks among the evaluations)")


@dataclass
class InContextResult:
    """What :func:`meta_train_incontext` returns."""

    params: Params  # meta-trained weights of the learner (detached)
    val: dict[str, float]  # final evaluation on val sequences
    test: dict[str, float]  # final evaluation on test sequences
    losses: list[float] = field(default_factory=list)  # meta-training loss per step
    wall_s: float = 0.0  # seconds of meta-training (without the final evaluation)
    num_params: int = 0  # size of the learner

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("params")
        return d


def log_metrics(logger: Logger, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
    """Send a metrics dict through ``logger``: one-element tensors and numbers as scalars,
    larger tensors as histograms (e.g. a core's ``srwm/beta/<M>``, ``hypernet/*`` stats)."""
    for k, v in metrics.items():
        if isinstance(v, Tensor) and v.numel() != 1:
            logger.histogram(prefix + k, v.detach(), step)
        else:
            logger.scalar(prefix + k, v, step)


def _log_internals(logger: Logger, model: Any, params: Params, inputs: Tensor, step: int) -> None:
    log_metrics(logger, model.internals(params, inputs), step, prefix=f"{model.name}/")


def meta_train_incontext(
    task: Any,
    config: InContextConfig = InContextConfig(),
    logger: Logger | None = None,
    seed: int = 0,
    params: Params | None = None,
    *,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 0,
    resume: dict[str, Any] | None = None,
) -> InContextResult:
    """Meta-train ``task.model`` on ``task`` (fewshot-digits) by backprop through sequences.

    Each step: a fresh batch of train sequences (``task.batch("train", step, seed)``), the
    cross-entropy over all positions, backpropagation through the whole sequence, global
    norm clipping, one Adam step. With ``lr_schedule="cosine"`` the learning rate decays as
    ½(1 + cos(π·progress)), progress the larger of step/steps and elapsed/max_seconds, so it
    anneals by whichever budget binds first. With ``keep_best`` the returned weights are those
    of the evaluation (every ``eval_every`` steps, and the last) with the lowest val loss.
    Logs ``meta/loss``, ``meta/grad_norm`` every step, the learner's internals every
    ``log_every`` steps, ``val/*`` every ``eval_every``; ends with val and test evaluations
    (``acc@k`` = query accuracy after k examples).

    Args:
        task: a :class:`selfref.tasks.fewshot.FewShotDigits`.
        config: steps, Adam lr, clipping, logging cadence.
        logger: where to log (optional; nothing is logged without one).
        seed: seeds the init (``torch.Generator``) and the training sequences.
        params: start from these weights instead of a fresh init.
        checkpoint: called with the training state (a dict of tensors and numbers: ``step``
            — the next step —, ``params``, ``optimizer``, ``losses``, ``best``,
            ``elapsed_s``, ``seed``) every ``checkpoint_every`` steps and once at the end;
            a run directory saves it (``torch.save``).
        resume: such a state: training continues from its step and ends exactly as the
            uninterrupted run would (the batches depend only on (step, seed); a time limit
            counts the time already spent).
    """
    if config.steps < 0:
        raise ValueError(f"steps must be >= 0, got {config.steps}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    start = 0
    if resume is not None:
        if resume.get("seed", seed) != seed:
            raise ValueError(f"resume state was trained with seed {resume['seed']}, not {seed}")
        init = resume["params"]
        start = int(resume["step"])
    else:
        init = (
            params if params is not None else task.init_params(torch.Generator().manual_seed(seed))
        )
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=config.lr)
    losses: list[float] = []
    best: tuple[float, Params, dict[str, float]] | None = None
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        losses = list(resume["losses"])
        if resume.get("best") is not None:
            b = resume["best"]
            best = (float(b["loss"]), dict(b["params"]), dict(b["val"]))
    t0 = time.perf_counter() - (float(resume["elapsed_s"]) if resume is not None else 0.0)

    def state(next_step: int) -> dict[str, Any]:
        return {
            "step": next_step,
            "params": tree_detach(leaves),
            "optimizer": opt.state_dict(),
            "losses": list(losses),
            "best": None if best is None else {"loss": best[0], "params": best[1], "val": best[2]},
            "elapsed_s": time.perf_counter() - t0,
            "seed": seed,
        }

    for step in range(start, config.steps):
        elapsed = time.perf_counter() - t0
        if config.max_seconds and elapsed > config.max_seconds:
            break
        if config.lr_schedule == "cosine":
            progress = step / config.steps
            if config.max_seconds:
                progress = max(progress, elapsed / config.max_seconds)
            for group in opt.param_groups:
                group["lr"] = config.lr * cosine_decay(progress)
        batch = task.batch("train", step, seed)
        loss = task.loss(leaves, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(leaves.values()), config.grad_clip)
        opt.step()
        lv = float(loss.detach())
        losses.append(lv)
        if not math.isfinite(lv):
            raise FloatingPointError(f"meta-training loss became {lv} at step {step}")
        if logger is not None:
            logger.scalar("meta/loss", lv, step)
            logger.scalar("meta/grad_norm", gn, step)
            if config.log_every and step % config.log_every == 0:
                _log_internals(logger, task.model, tree_detach(leaves), batch["inputs"], step)
        wants_eval = logger is not None or config.keep_best  # else nobody reads it
        if wants_eval and config.eval_every and step > 0 and step % config.eval_every == 0:
            current = tree_detach(leaves)
            ev = task.evaluate(current, "val")
            if logger is not None:
                for k, v in ev.items():
                    logger.scalar(f"val/{k}", v, step)
            if config.keep_best and (best is None or ev["loss"] < best[0]):
                best = (ev["loss"], {k: v.clone() for k, v in current.items()}, ev)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(state(step + 1))
    if checkpoint is not None:
        checkpoint(state(len(losses)))
    wall = time.perf_counter() - t0
    final = tree_detach(leaves)
    val = task.evaluate(final, "val")
    if best is not None and best[0] < val["loss"]:
        final, val = best[1], best[2]
    test = task.evaluate(final, "test")
    if logger is not None:
        for k, v in val.items():
            logger.scalar(f"val/{k}", v, len(losses))
        for k, v in test.items():
            logger.scalar(f"test/{k}", v, len(losses))
    return InContextResult(
        params=final,
        val=val,
        test=test,
        losses=losses,
        wall_s=wall,
        num_params=sum(v.numel() for v in final.values()),
    )


def evaluate_query_accuracy(task: Any, params: Params, split: str = "test") -> dict[str, float]:
    """``acc@k`` of the learner on the task's fixed ``split`` sequences (see ``evaluate``)."""
    return {k: v for k, v in task.evaluate(params, split).items() if k.startswith("acc@")}


# --------------------------------------------------------------------------------------
# Baseline: a linear classifier trained by gradient descent on the same examples
# --------------------------------------------------------------------------------------


def sgd_query_accuracy(x: Tensor, y: Tensor, k: int, ways: int, lr: float, steps: int) -> Tensor:
    """Per-sequence hit (b,) of a linear classifier trained on the first k examples.

    For each sequence, softmax regression W (w, p), bias (w), from zero, trained by ``steps``
    steps of (full-batch) gradient descent with learning rate ``lr`` on the mean
    cross-entropy of examples 0..k−1; then it predicts example k — the same query and the
    same k labelled examples the sequence learner has when it predicts position k.

    Args:
        x: (b, n, p) inputs. y: (b, n) labels. k: examples to train on (1 <= k < n).
    """
    if not 1 <= k < x.shape[1]:
        raise ValueError(f"k must be in 1..{x.shape[1] - 1}, got {k}")
    xs, ys = x[:, :k].double(), y[:, :k]  # (b, k, p), (b, k)
    onehot = Fn.one_hot(ys, ways).double()  # (b, k, w)
    W = xs.new_zeros(x.shape[0], ways, x.shape[2])  # (b, w, p)
    bias = xs.new_zeros(x.shape[0], ways)  # (b, w)
    for _ in range(steps):
        logits = torch.einsum("bkp,bwp->bkw", xs, W) + bias[:, None]
        err = (torch.softmax(logits, -1) - onehot) / k  # dL/dlogits (b, k, w)
        W = W - lr * torch.einsum("bkw,bkp->bwp", err, xs)
        bias = bias - lr * err.sum(1)
    q = torch.einsum("bp,bwp->bw", x[:, k].double(), W) + bias  # (b, w)
    return (q.argmax(-1) == y[:, k]).double()


@dataclass(frozen=True)
class SGDChoice:
    """The tuned baseline setting for one k."""

    k: int
    lr: float
    steps: int
    train_acc: float  # query accuracy on the held-in sequences used for tuning


def tune_sgd(
    task: Any,
    ks: Sequence[int],
    lrs: Sequence[float] = (1e-3, 10**-2.5, 1e-2, 10**-1.5, 0.1, 10**-0.5, 1.0, 10**0.5, 10.0),
    steps_grid: Sequence[int] = (1, 10, 50),
    sequences: int = 500,
    seed: int = 1,
) -> dict[int, SGDChoice]:
    """Grid search of (lr, steps) per k on ``sequences`` train-split (held-in) sequences.

    The default lr grid is 10^{-3}, 10^{-2.5}, ..., 10^{1}; ties keep the first (smallest lr).
    """
    with torch.no_grad():
        batch = task.sequences("train", sequences, seed, step=20_000_000)
        out = {}
        for k in ks:
            best: SGDChoice | None = None
            for steps in steps_grid:
                for lr in lrs:
                    acc = float(
                        sgd_query_accuracy(batch["x"], batch["y"], k, task.ways, lr, steps).mean()
                    )
                    if best is None or acc > best.train_acc:
                        best = SGDChoice(k, float(lr), int(steps), acc)
            assert best is not None
            out[k] = best
    return out


def sgd_eval(task: Any, choices: dict[int, SGDChoice], split: str = "test") -> dict[str, float]:
    """``acc@k`` of the tuned baseline on exactly the sequences ``task.evaluate`` uses."""
    return {f"acc@{k}": float(h.mean()) for k, h in sgd_hits(task, choices, split).items()}


def sgd_hits(task: Any, choices: dict[int, SGDChoice], split: str = "test") -> dict[int, Tensor]:
    """Per-sequence hits (s,) of the tuned baseline for each k, on the fixed sequences of
    ``split`` in ``task.query_hits``'s order (for paired differences)."""
    out: dict[int, list[Tensor]] = {k: [] for k in choices}
    with torch.no_grad():
        for batch in task.eval_batches(split):
            for k, ch in choices.items():
                hit = sgd_query_accuracy(batch["x"], batch["y"], k, task.ways, ch.lr, ch.steps)
                out[k].append(hit.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean of ``a − b`` over paired per-sequence hits and its standard error."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"need two paired 1-d hit vectors, got {tuple(a.shape)}, {tuple(b.shape)}")
    d = a.double() - b.double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))
