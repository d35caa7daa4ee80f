"""The self-referential network (Schmidhuber 1993) in four submodels, one file each.

- ``normal.py``: the task network whose weights θ are modified;
- ``evaluation.py``: Q on a batch, ∇θQ, and an optional learned validation-loss estimate;
- ``analyzing.py``: per-coordinate features (Andrychowicz et al. 2016 preprocessing, ...);
- ``modifying.py``: applies a core's Δθ; cores live in ``cores/`` (lstm, hypernet, srwm);
- ``network.py``: :class:`SelfReferentialNet`, the pure ``step`` composing them;
- ``optimizer.py``: :class:`LearnedOptimizer`, a meta-trained modifier as a torch optimizer.
"""

from __future__ import annotations

from selfref.net.analyzing import Analyzer, AnalyzerConfig, log_sign_preprocess
from selfref.net.cores import CORES, core_names, make_core
from selfref.net.evaluation import EvaluationConfig, EvaluationModel
from selfref.net.modifying import Modifier
from selfref.net.network import NetState, SelfReferentialNet
from selfref.net.normal import NormalModel

__all__ = [
    "SelfReferentialNet",
    "NetState",
    "NormalModel",
    "EvaluationModel",
    "EvaluationConfig",
    "Analyzer",
    "AnalyzerConfig",
    "log_sign_preprocess",
    "Modifier",
    "make_core",
    "core_names",
    "CORES",
]
