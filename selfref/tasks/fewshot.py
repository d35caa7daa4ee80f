"""In-context few-shot learning on digits: ``fewshot-digits`` (sequences that define tasks).

The setting of meta-learning by sequence models (Hochreiter, Younger, Conwell 2001; Santoro
et al. 2016; Irie et al. 2022, "A Modern Self-Referential Weight Matrix That Learns to
Modify Itself", section 4): every sequence is its own classification task. A sequence
draws ``ways`` digit classes and a random label permutation (which class is label 0, 1,
...), and a random linear projection P of the 64 pixel features. Two protocols lay the
examples out:

- ``protocol="delayed"`` (the default; the delayed-label setting of Irie et al. 2022,
  section 4.2): ``length`` examples with labels drawn uniformly from the ``ways`` labels. At
  position t the model receives ``(P x_t, one-hot(y_{t−1}))`` (zeros at t = 0) and must
  predict y_t, so it can only be right by learning the sequence's task from the sequence
  itself: the label of x_t arrives one step later, with x_{t+1}. Every position is scored.
- ``protocol="synchronous"`` (the synchronous-label setting of section 4.1 / Table 1, the
  standard N-way K-shot task): ``shots`` distinct images of each of the ``ways`` classes,
  the support set, in a random order, each fed *with its own label*
  ``(P x_t, one-hot(y_t))``; then one query image of a class drawn uniformly from the
  ``ways``, distinct from the support images, fed with a dummy label: ``one-hot(0)``, the
  same for every query (as the paper's code, IDSIA/modern-srwm ``main_few_shot_sync.py``:
  "does not matter which label to feed for the last position as long as it's consistently
  the same one"). Only the prediction at the query (the last position, n = ways·shots + 1)
  is scored, in the loss and in ``evaluate``.

Held-out sequences never reuse what meta-training saw:

- images: train sequences draw from the train split of the fixed digits split, val/test
  sequences from the val/test splits;
- class→label maps: the ordered ``ways``-tuples of classes are partitioned by index, 10% for
  test, 10% for val, 80% for train, so no held-out map ever occurs in training;
- projections and label draws: from generators seeded by ``(seed, step, split)`` — disjoint
  streams per split (a continuous Gaussian P is never repeated).

Task protocol, as far as it sensibly goes: the *parameters* are the weights of the sequence
learner (the meta-learner), ``init_params`` draws them, ``loss(params, batch)`` is the mean
cross-entropy of its predictions over the scored positions of all sequences of the batch
(the meta-training objective, backpropagated through the whole sequence), and
``evaluate(params, split)`` runs it on ``eval_sequences`` fixed sequences of the split and
reports ``loss``, ``accuracy`` (scored positions) and ``acc@k`` — the query accuracy after
k labelled examples, i.e. of the prediction at position k — for k in (1, 5, 10, 20) below
``length`` (delayed) or k = ways·shots (synchronous: the query). The task is handed its
learner (``task.with_model(model)``; the learners live in :mod:`selfref.net.sequence`, which
this module never imports).

Batch: ``x`` (b, n, p) projected inputs, ``y`` (b, n) labels (in the synchronous protocol
the last one is the query's true label, the target), ``inputs`` (b, n, p + ways) the model's
input, ``classes`` (b, ways) the digit class of each label.

Notation: b – sequences per batch, n – length, p – projected features, w – ways.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as Fn
from torch import Tensor

from selfref.params import Params
from selfref.tasks.base import (
    NO_OPTIONS,
    SPLIT_SALT,
    Batch,
    check_split,
    mix_seed,
    resolve_device,
)
from selfref.tasks.digits import load_digits_splits

__all__ = ["FewShotDigits", "mapping_split", "QUERY_KS", "PROJECTIONS", "PROTOCOLS"]

# "random": a new P per sequence (the task); "fixed": one P (seed 0) shared by every sequence
# of every split — an ablation that removes the projection's part of the difficulty
PROJECTIONS: tuple[str, ...] = ("random", "fixed")

# "delayed": labels one step late, every position scored (Irie et al. 2022, section 4.2);
# "synchronous": an N-way K-shot support set with its labels, then a query (section 4.1)
PROTOCOLS: tuple[str, ...] = ("delayed", "synchronous")
_DEFAULT_LENGTH = 25  # examples per delayed-label sequence unless given

QUERY_KS: tuple[int, ...] = (1, 5, 10, 20)  # "accuracy after k examples" reported by evaluate
_NUM_CLASSES = 10
_TEST_MOD, _VAL_MOD = 0, 1  # mapping index % 10: 0 -> test, 1 -> val, else train


def _mapping_index(classes: list[int]) -> int:
    """Mixed-radix index of an ordered tuple of distinct classes (a class→label map)."""
    idx, avail = 0, list(range(_NUM_CLASSES))
    for c in classes:
        pos = avail.index(c)
        idx = idx * len(avail) + pos
        avail.pop(pos)
    return idx


# the split that owns a class→label map, by its mapping index mod 10 (the one rule)
_OWNER: tuple[str, ...] = tuple(
    "test" if r == _TEST_MOD else "val" if r == _VAL_MOD else "train" for r in range(10)
)


def mapping_split(classes: list[int]) -> str:
    """Which split owns the class→label map ``classes`` (label i is digit ``classes[i]``)."""
    return _OWNER[_mapping_index(classes) % 10]


@lru_cache(maxsize=8)
def _class_pools(split_seed: int, split: str) -> tuple[Tensor, Tensor]:
    """Row indices per class padded into one tensor (10, m), and the class sizes (10,)."""
    index = _class_index(split_seed, split)
    sizes = torch.tensor([len(ix) for ix in index])
    pools = torch.zeros(_NUM_CLASSES, int(sizes.max()), dtype=torch.int64)
    for c, ix in enumerate(index):
        pools[c, : len(ix)] = torch.tensor(ix)
    return pools, sizes


@lru_cache(maxsize=8)
def _class_index(split_seed: int, split: str) -> tuple[tuple[int, ...], ...]:
    """For each digit class, the row indices of that class in ``split``."""
    _, y = load_digits_splits(split_seed)[split]
    return tuple(tuple(torch.nonzero(y == c).flatten().tolist()) for c in range(_NUM_CLASSES))


class FewShotDigits:
    """Sequences of (P x_t, previous label) on digits; each sequence is its own w-way task.

    Args:
        ways: classes per sequence, w (2–10).
        length: examples per sequence, n (delayed: default 25, must exceed the largest k you
            want to evaluate; synchronous: ways·shots + 1, the default — another value is an
            error).
        protocol: ``"delayed"`` (labels one step late, every position scored; Irie et al.
            2022, section 4.2) or ``"synchronous"`` (a ``ways``-way ``shots``-shot support set
            with its labels, then a query with a dummy label, only the query scored; section
            4.1 / Table 1). See the module docstring.
        shots: K, images per class in the support set (synchronous only; default 1).
        proj_dim: p, output size of each sequence's random projection P ~ N(0, 1/64)^{p×64}.
        batch_size: sequences per batch.
        eval_sequences: how many fixed sequences ``evaluate`` runs per split.
        model: the sequence learner whose weights are this task's params (an object with
            ``init_params`` and ``forward``, e.g. from
            :func:`selfref.net.sequence.make_sequence_model` with ``in_dim=task.input_dim``
            and ``num_classes=ways``); None until :meth:`with_model` hands one over.
        projection: ``"random"`` (a new P per sequence: the task) or ``"fixed"`` (one P for
            all sequences — an ablation, not the task).
        min_ways: (delayed only) an option beside the issue's setting (default ``None``:
            every sequence uses all ``ways`` labels). When set, each *meta-training* sequence
            (``batch`` on the train split) uses only c labels, c uniform in
            ``min_ways..ways`` and the c labels a random subset of the ``ways`` — a mixture
            of easier tasks that gives learners a gradient signal on the chance plateau,
            where full-way sequences give almost none (the data-distribution lever of Kirsch
            et al. 2022, "General-purpose in-context learning by meta-learning transformers",
            section 4.4). Val/test sequences and ``sequences`` called directly always use all
            ``ways``.
        min_ways_steps: (delayed only) with ``min_ways``, a curriculum (default ``None``: the
            mixture at every step): train batches of steps >= ``min_ways_steps`` use all
            ``ways`` again. The mixture teaches that some labels may never occur, which the
            all-way evaluation contradicts (a query unlike every example so far is likely of
            a label not seen yet); finishing on all-way sequences undoes that.
        split_seed: seed of the fixed digits train/val/test split.
        seed: the seed ``evaluate`` uses to pick a split's sequences.
        device, dtype: placement of params and batches.

    Example:
        >>> task = FewShotDigits(ways=5, length=8, batch_size=4)  # then task.with_model(m)
        >>> batch = task.batch("train", 0, seed=0)
        >>> batch["inputs"].shape
        torch.Size([4, 8, 37])
    """

    name: ClassVar[str] = "fewshot-digits"
    step_invariant: ClassVar[bool] = False  # every step draws new sequences
    search_defaults: ClassVar[Mapping[str, Any]] = NO_OPTIONS
    EVAL_BLOCK: ClassVar[int] = 250  # evaluation sequences are drawn (and run) in blocks
    description: ClassVar[str] = (
        "in-context few-shot digits: sequences of (projected x, previous label), "
        "a new label permutation and projection per sequence"
    )

    def __init__(
        self,
        ways: int = 5,
        length: int | None = None,
        proj_dim: int = 32,
        batch_size: int = 32,
        eval_sequences: int = 1000,
        model: Any = None,
        projection: str = "random",
        min_ways: int | None = None,
        min_ways_steps: int | None = None,
        protocol: str = "delayed",
        shots: int | None = None,
        split_seed: int = 0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 2 <= ways <= _NUM_CLASSES:
            raise ValueError(f"ways must be in 2..{_NUM_CLASSES}, got {ways}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        if protocol == "synchronous":
            shots = 1 if shots is None else shots
            if shots < 1:
                raise ValueError(f"shots must be >= 1, got {shots}")
            if length is not None and length != ways * shots + 1:
                raise ValueError(
                    f"length={length} does not fit protocol='synchronous': a sequence is "
                    f"ways·shots + 1 = {ways * shots + 1} long (leave length unset)"
                )
            for name, v in (("min_ways", min_ways), ("min_ways_steps", min_ways_steps)):
                if v is not None:
                    raise ValueError(f"{name} applies to protocol='delayed' only, got {name}={v}")
            smallest = min(
                min(len(ix) for ix in _class_index(split_seed, s)) for s in ("train", "val", "test")
            )
            if shots + 1 > smallest:
                raise ValueError(
                    f"shots={shots} needs {shots + 1} distinct images per class (support and "
                    f"query); the smallest class of a split has {smallest}"
                )
            length = ways * shots + 1
        elif shots is not None:
            raise ValueError(f"shots applies to protocol='synchronous' only, got shots={shots}")
        length = _DEFAULT_LENGTH if length is None else length
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; valid: {', '.join(PROJECTIONS)}")
        if eval_sequences < 1:
            raise ValueError(f"eval_sequences must be >= 1, got {eval_sequences}")
        if min_ways is not None and not 2 <= min_ways <= ways:
            raise ValueError(f"min_ways must be in 2..ways={ways}, got {min_ways}")
        self.ways = ways
        self.protocol = protocol
        self.shots = shots
        self.length = length
        self.proj_dim = proj_dim
        self.batch_size = batch_size
        self.eval_sequences = eval_sequences
        self.projection = projection
        if min_ways_steps is not None and min_ways_steps < 0:
            raise ValueError(f"min_ways_steps must be >= 0, got {min_ways_steps}")
        self.min_ways = ways if min_ways is None else min_ways
        self.min_ways_steps = min_ways_steps
        self.split_seed = split_seed
        self.seed = seed
        self.device = resolve_device(device)
        self.dtype = dtype
        self.data = load_digits_splits(split_seed, self.device, dtype)
        self.input_dim = proj_dim + ways
        self.num_classes = ways  # the learner predicts one of the sequence's w labels
        self._model: Any = model
        self._eval_cache: dict[tuple[str, int, int], Batch] = {}

    # -- the learner -------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The sequence learner this task trains (see :meth:`with_model`)."""
        if self._model is None:
            raise ValueError(
                "fewshot-digits has no learner yet: hand it one with task.with_model("
                "selfref.net.sequence.make_sequence_model(name, task.input_dim, task.ways))"
            )
        return self._model

    def with_model(self, model: Any) -> FewShotDigits:
        """A copy of this task that trains ``model`` (data and caches are shared)."""
        out = copy.copy(self)
        out._model = model
        return out

    def init_params(self, generator: torch.Generator) -> Params:
        p = self.model.init_params(generator)
        return {k: v.to(self.device, self.dtype) for k, v in p.items()}

    def logits(self, params: Params, batch: Batch) -> Tensor:
        """The learner's predictions (b, n, w) for every position of every sequence."""
        out, _ = self.model.forward(params, batch["inputs"])
        return out

    @property
    def scored(self) -> slice:
        """The positions the protocol scores: all (delayed), the last one (synchronous)."""
        return slice(None) if self.protocol == "delayed" else slice(self.length - 1, None)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Mean cross-entropy over the scored positions of all sequences (meta-training
        loss): every position (delayed), the query (synchronous)."""
        logits = self.logits(params, batch)[:, self.scored]  # (b, n or 1, w)
        return Fn.cross_entropy(
            logits.reshape(-1, self.ways), batch["y"][:, self.scored].reshape(-1)
        )

    # -- data --------------------------------------------------------------------------

    def num_examples(self, split: str) -> int:
        check_split(split)
        return int(self.data[split][1].shape[0])

    def full_batch(self, split: str) -> None:
        """None: the loss is over sequences, which are drawn, not a fixed data set."""
        check_split(split)
        return None

    def _draw_mapping(self, split: str, g: torch.Generator) -> list[int]:
        for _ in range(10_000):
            classes = torch.randperm(_NUM_CLASSES, generator=g)[: self.ways].tolist()
            if mapping_split(classes) == split:
                return classes
        raise RuntimeError(f"no class->label map for split {split!r} after 10000 draws")

    def sequences(self, split: str, count: int, seed: int, step: int = 0) -> Batch:
        """``count`` sequences, sequence i drawn from a generator seeded by (seed, step, i).

        Every sequence uses all ``ways`` labels (the fixed evaluation sequences and the SGD
        baseline's tuning sequences come from here).
        """
        check_split(split)
        x_all, _ = self.data[split]
        index = _class_index(self.split_seed, split)
        xs, ys, cls, projs = [], [], [], []
        for i in range(count):
            g = torch.Generator().manual_seed(mix_seed(seed, step, i, SPLIT_SALT[split], 0xF5))
            if self.protocol == "synchronous":
                mapping = self._draw_mappings(split, 1, g)  # (1, w)
                labels_t, rows_t = self._synchronous_examples(split, mapping, g)  # (1, n)
                classes, labels, rows = mapping[0].tolist(), labels_t[0], rows_t[0].tolist()
            else:
                classes = self._draw_mapping(split, g)
                labels = torch.randint(self.ways, (self.length,), generator=g)  # (n,)
                u = torch.rand(self.length, generator=g, dtype=torch.float64).tolist()
                rows = []
                for lab, ui in zip(labels.tolist(), u):
                    pool = index[classes[lab]]
                    rows.append(pool[int(ui * len(pool))])
            if self.projection == "random":
                proj = torch.randn(self.proj_dim, x_all.shape[1], generator=g, dtype=torch.float64)
            else:
                proj = self._fixed_projection()
            xs.append(torch.tensor(rows))
            ys.append(labels)
            cls.append(torch.tensor(classes))
            projs.append(proj / math.sqrt(x_all.shape[1]))
        rows_t = torch.stack(xs).to(self.device)  # (b, n)
        P = torch.stack(projs).to(self.device, self.dtype)  # (b, p, 64)
        x = torch.einsum("bpf,bnf->bnp", P, x_all[rows_t])  # (b, n, p)
        y = torch.stack(ys).to(self.device)  # (b, n)
        return self._pack(x, y, torch.stack(cls).to(self.device))

    def batch(self, split: str, step: int, seed: int) -> Batch:
        """``batch_size`` sequences; the same (split, step, seed) gives the same tensors.

        Drawn in one vectorized pass from one generator seeded by (seed, step, split) — the
        meta-training path, which must keep up with a GPU (the per-sequence loop of
        :meth:`sequences`, used for the fixed evaluation sequences, costs ~0.13 ms per
        sequence). Same distribution and the same held-out guarantees as :meth:`sequences`.
        Train-split batches follow ``min_ways`` and ``min_ways_steps`` (see the class
        docstring); val/test use all ``ways``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        check_split(split)
        g = torch.Generator().manual_seed(mix_seed(seed, step, SPLIT_SALT[split], 0xBA7C))
        b, n, w = self.batch_size, self.length, self.ways
        classes = self._draw_mappings(split, b, g)  # (b, w)
        if self.protocol == "synchronous":
            labels, rows = self._synchronous_examples(split, classes, g)  # (b, n), (b, n)
        else:
            mixing = self.min_ways_steps is None or step < self.min_ways_steps
            low = self.min_ways if split == "train" and mixing else self.ways
            # labels: c ~ U{low..w} active labels per sequence, a random subset of the w
            c = torch.randint(low, w + 1, (b, 1), generator=g)  # (b, 1)
            active = torch.argsort(torch.rand(b, w, generator=g), dim=1)  # (b, w) random order
            pick = (torch.rand(b, n, generator=g, dtype=torch.float64) * c).long()  # (b, n) < c
            labels = torch.gather(active, 1, pick)  # (b, n)
            # images: uniform within the class of each label
            pools, sizes = _class_pools(self.split_seed, split)  # (10, m), (10,)
            cls = torch.gather(classes, 1, labels)  # (b, n) digit class per position
            u = torch.rand(b, n, generator=g, dtype=torch.float64)
            rows = pools[cls, (u * sizes[cls]).long()]  # (b, n)
        x_all, _ = self.data[split]
        feats = x_all.shape[1]
        if self.projection == "random":
            proj = torch.randn(b, self.proj_dim, feats, generator=g)
        else:
            proj = self._fixed_projection().expand(b, -1, -1)
        P = (proj / math.sqrt(feats)).to(self.device, self.dtype)  # (b, p, 64)
        x = torch.einsum("bpf,bnf->bnp", P, x_all[rows.to(self.device)])  # (b, n, p)
        return self._pack(x, labels.to(self.device), classes.to(self.device))

    def _fixed_projection(self) -> Tensor:
        """The one unscaled P (p, 64) float64 of ``projection="fixed"`` (seed 0)."""
        feats = self.data["train"][0].shape[1]
        g = torch.Generator().manual_seed(0)
        return torch.randn(self.proj_dim, feats, generator=g, dtype=torch.float64)

    def _synchronous_examples(
        self, split: str, classes: Tensor, g: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Labels (b, n) and image rows (b, n) of synchronous-label sequences.

        Per sequence: ``shots`` distinct images of each label's class, in a random order
        (the support set, positions 0..n−2), then one more image of a uniformly drawn label's
        class, distinct from that class's support images (the query, position n−1).
        """
        b, w, k = classes.shape[0], self.ways, int(self.shots or 1)
        pools, sizes = _class_pools(self.split_seed, split)  # (10, m), (10,)
        m = pools.shape[1]
        # k + 1 distinct pool positions per (sequence, label): a random order of its class
        keys = torch.rand(b, w, m, generator=g)  # (b, w, m)
        keys = keys.masked_fill(torch.arange(m) >= sizes[classes][..., None], 2.0)
        pos = keys.argsort(-1)[..., : k + 1]  # (b, w, k+1), all inside the class's pool
        rows = pools[classes[..., None], pos]  # (b, w, k+1) image rows
        support = rows[..., :k].reshape(b, w * k)  # label j's shots at j·k .. j·k + k − 1
        labels = torch.arange(w).repeat_interleave(k).expand(b, -1)  # (b, w·k)
        order = torch.rand(b, w * k, generator=g).argsort(1)  # a random order of the support
        support, labels = torch.gather(support, 1, order), torch.gather(labels, 1, order)
        query = torch.randint(w, (b, 1), generator=g)  # (b, 1) the query's label
        query_row = rows[torch.arange(b), query[:, 0], k]  # (b,) not among the support
        return torch.cat([labels, query], 1), torch.cat([support, query_row[:, None]], 1)

    def _pack(self, x: Tensor, y: Tensor, classes: Tensor) -> Batch:
        if self.protocol == "synchronous":  # each example's own label; the query a dummy 0
            fed = torch.cat([y[:, :-1], torch.zeros_like(y[:, :1])], dim=1)  # (b, n)
            prev = Fn.one_hot(fed, self.ways).to(self.dtype)  # (b, n, w)
        else:
            prev = Fn.one_hot(y[:, :-1], self.ways).to(self.dtype)  # (b, n-1, w)
            prev = torch.cat([torch.zeros_like(prev[:, :1]), prev], dim=1)  # (b, n, w)
        return {
            "x": x,
            "y": y,
            "inputs": torch.cat([x, prev], dim=-1),  # (b, n, p + w)
            "classes": classes,
        }

    def _draw_mappings(self, split: str, count: int, g: torch.Generator) -> Tensor:
        """``count`` class→label maps owned by ``split`` (b, w), by vectorized rejection."""
        keep: list[Tensor] = []
        have = 0
        for _ in range(1000):
            m = 4 * count if split == "train" else 20 * count
            cand = torch.argsort(torch.rand(m, _NUM_CLASSES, generator=g), dim=1)[:, : self.ways]
            # mixed-radix index of each ordered tuple (as _mapping_index): position of c_j
            # among the classes not yet used = c_j − #{i < j : c_i < c_j}
            idx = torch.zeros(m, dtype=torch.int64)
            for j in range(self.ways):
                smaller = (cand[:, :j] < cand[:, j : j + 1]).sum(1)
                idx = idx * (_NUM_CLASSES - j) + (cand[:, j] - smaller)
            own = torch.tensor([o == split for o in _OWNER])[idx % 10]  # (m,) owned by split
            keep.append(cand[own])
            have += int(own.sum())
            if have >= count:
                return torch.cat(keep)[:count]
        raise RuntimeError(f"no class->label maps for split {split!r} after 1000 rounds")

    # -- evaluation --------------------------------------------------------------------

    @property
    def query_ks(self) -> tuple[int, ...]:
        """The k of ``acc@k``: 1, 5, 10, 20 below ``length`` (delayed), ways·shots (the
        query, synchronous)."""
        if self.protocol == "synchronous":
            return (self.length - 1,)
        return tuple(k for k in QUERY_KS if k < self.length)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        """Loss, accuracy and ``acc@k`` on ``eval_sequences`` fixed sequences of ``split``
        (loss and accuracy over the scored positions)."""
        loss_sum, hits = self._evaluate_pass(params, split)
        count = hits.shape[0]
        acc = hits.mean(0)  # (n,), NaN where not scored
        scored = acc[self.scored]
        out = {"loss": loss_sum / (count * scored.numel()), "accuracy": float(scored.mean())}
        for k in self.query_ks:
            out[f"acc@{k}"] = float(acc[k])
        return out

    @torch.no_grad()
    def query_hits(self, params: Params, split: str) -> Tensor:
        """Per-sequence, per-position hits (s, n) (1.0 where the prediction is right) on the
        ``eval_sequences`` fixed sequences of ``split`` — for paired comparisons with a
        baseline on the same sequences (``acc@k`` is ``hits[:, k].mean()``). Positions the
        protocol does not score (the synchronous support set) are NaN."""
        return self._evaluate_pass(params, split)[1]

    def _evaluate_pass(self, params: Params, split: str) -> tuple[float, Tensor]:
        check_split(split)
        total_loss, hits = 0.0, []
        for batch in self.eval_batches(split):
            logits = self.logits(params, batch)  # (m, n, w)
            y = batch["y"]
            total_loss += float(
                Fn.cross_entropy(
                    logits[:, self.scored].reshape(-1, self.ways),
                    y[:, self.scored].reshape(-1),
                    reduction="sum",
                )
            )
            hit = (logits.argmax(-1) == y).to(torch.float64).cpu()  # (m, n)
            if self.protocol == "synchronous":
                hit[:, : self.length - 1] = math.nan  # the support set is not predicted
            hits.append(hit)
        return total_loss, torch.cat(hits)

    def eval_batches(self, split: str) -> list[Batch]:
        """The fixed evaluation sequences of ``split`` in blocks, in order.

        Block ``start`` (every ``EVAL_BLOCK`` sequences) is :meth:`sequences` with the task's
        ``seed`` and step 10^7 + start, drawn once and cached — so the first m evaluation
        sequences are the same whatever ``eval_sequences`` is.
        """
        check_split(split)
        out = []
        for start in range(0, self.eval_sequences, self.EVAL_BLOCK):
            m = min(self.EVAL_BLOCK, self.eval_sequences - start)
            key = (split, m, start)
            if key not in self._eval_cache:  # fixed sequences: drawn once, reused
                self._eval_cache[key] = self.sequences(split, m, self.seed, step=10_000_000 + start)
            out.append(self._eval_cache[key])
        return out
