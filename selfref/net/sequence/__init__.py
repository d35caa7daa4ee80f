"""Sequence learners for in-context learning: functional models whose weights are meta-trained.

Each learner has ``init_params(generator)``, ``forward(params, inputs, state=None) ->
(logits, state)`` and ``internals(params, inputs) -> dict`` (for logging); one file each:

- :class:`SRWMSequenceModel` (``srwm.py``) — Irie et al. 2022's few-shot model;
- :class:`LSTMSequenceModel` (``lstm.py``) — one LSTM layer;
- :class:`HyperLSTMSequenceModel` (``hyperlstm.py``) — Ha, Dai, Le 2016.

A task that trains one (``fewshot-digits``) is handed the learner
(``task.with_model(make_sequence_model(...))``); it never imports this package.
"""

from __future__ import annotations

from typing import Any

from selfref.net.sequence.hyperlstm import HyperLSTMSequenceModel
from selfref.net.sequence.lstm import LSTMSequenceModel, lstm_scan
from selfref.net.sequence.srwm import SRWMSequenceModel
from selfref.options import check_options

__all__ = [
    "SRWMSequenceModel",
    "LSTMSequenceModel",
    "HyperLSTMSequenceModel",
    "SEQUENCE_MODELS",
    "CORE_TO_MODEL",
    "make_sequence_model",
    "lstm_scan",
]

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
    check_options(f"sequence model {name!r}", SEQUENCE_MODELS[key], options,
                  exclude=("in_dim", "num_classes"))  # fmt: skip
    try:
        return SEQUENCE_MODELS[key](in_dim, num_classes, **options)
    except TypeError as e:
        raise ValueError(f"bad option for sequence model {name!r}: {e}") from e
