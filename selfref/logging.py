"""Loggers: one small protocol, four implementations.

Library code takes a ``Logger`` argument and never creates one. Tags are namespaced with
slashes (``inner/loss``, ``val/loss``, ``meta/loss``, ``meta/grad_norm``,
``modify/update_norm``, ``hparams/<name>``, ``best/val_loss_vs_grad_evals``).

- :class:`TensorBoardLogger` writes event files through ``torch.utils.tensorboard``.
- :class:`PrintLogger` prints scalars every ``every`` steps (for terminals and CI logs).
- :class:`MemoryLogger` keeps everything in lists (for tests and programmatic use).
- :class:`MultiLogger` fans out to several loggers.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "log_metrics",
    "Logger",
    "TensorBoardLogger",
    "PrintLogger",
    "MemoryLogger",
    "MultiLogger",
    "NullLogger",
]

Scalar = float | int


@runtime_checkable
class Logger(Protocol):
    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None: ...

    def histogram(self, tag: str, values: Tensor, step: int) -> None: ...

    def text(self, tag: str, text: str, step: int = 0) -> None: ...

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """One entry per run for TensorBoard's HParams tab."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _to_float(v: Scalar | Tensor) -> float:
    return float(v.detach().item()) if isinstance(v, Tensor) else float(v)


def _hparam_value(v: Any) -> Any:
    """TensorBoard's hparams accept bool/int/float/str; anything else is stringified."""
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Tensor) and v.numel() == 1:
        return float(v)
    return str(v)


class TensorBoardLogger:
    """Writes scalars, histograms, text and one hparams entry into ``logdir``.

    The hparams entry is written into the same event directory as the scalars (not a
    timestamped sub-run, as ``SummaryWriter.add_hparams`` would do), so each run is one row of
    the HParams tab with its metric columns.
    """

    def __init__(self, logdir: str | Path, flush_secs: int = 10) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=flush_secs)

    @property
    def writer(self) -> Any:
        return self._writer

    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None:
        self._writer.add_scalar(tag, _to_float(value), int(step))

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        v = values.detach().float().cpu().reshape(-1)
        v = v[torch.isfinite(v)]
        if v.numel():
            self._writer.add_histogram(tag, v, int(step))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self._writer.add_text(tag, text, int(step))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hp_summary

        hp = {k: _hparam_value(v) for k, v in hparams.items()}
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        exp, ssi, sei = hp_summary(hp, clean)
        fw = self._writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in clean.items():
            self._writer.add_scalar(k, v, 0)

    def custom_scalars(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        """A custom-scalars layout: {category: {chart title: ["Multiline", [tag regexes]]}}."""
        self._writer.add_custom_scalars(layout)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class PrintLogger:
    """Prints ``step tag value`` lines; scalars only every ``every`` steps.

    Args:
        every: print a scalar only when ``step % every == 0``.
        stream: where to print (default stdout).
        prefixes: if given, print only scalars whose tag starts with one of these.
    """

    def __init__(
        self,
        every: int = 1,
        stream: TextIO | None = None,
        prefixes: Sequence[str] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.stream = stream or sys.stdout
        self.prefixes = tuple(prefixes) if prefixes is not None else None

    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None:
        if self.prefixes is not None and not tag.startswith(self.prefixes):
            return
        if step % self.every == 0:
            print(f"[{step:>6}] {tag} = {_to_float(value):.6g}", file=self.stream)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        print(f"[{step:>6}] {tag}: {text}", file=self.stream)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        print(f"hparams {dict(hparams)} -> {dict(metrics)}", file=self.stream)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.flush()


class MemoryLogger:
    """Keeps everything in memory: ``scalars[tag] = [(step, value), ...]`` and so on."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.histograms: dict[str, list[tuple[int, Tensor]]] = defaultdict(list)
        self.texts: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self.hparam_entries: list[tuple[dict[str, Any], dict[str, float]]] = []
        self.closed = False

    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None:
        self.scalars[tag].append((int(step), _to_float(value)))

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.histograms[tag].append((int(step), values.detach().cpu().clone()))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.texts[tag].append((int(step), text))

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.hparam_entries.append((dict(hparams), dict(metrics)))

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.scalars[tag]]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class NullLogger(MemoryLogger):
    """Discards everything (a MemoryLogger that keeps nothing)."""

    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None:
        pass

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        pass


class MultiLogger:
    """Sends every call to each of ``loggers``."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def scalar(self, tag: str, value: Scalar | Tensor, step: int) -> None:
        for lg in self.loggers:
            lg.scalar(tag, value, step)

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        for lg in self.loggers:
            lg.histogram(tag, values, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        for lg in self.loggers:
            lg.text(tag, text, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.hparams(hparams, metrics)

    def flush(self) -> None:
        for lg in self.loggers:
            lg.flush()

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def log_metrics(logger: Logger, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
    """Send a metrics dict through ``logger``: one-element tensors and numbers as scalars,
    larger tensors as histograms (e.g. a core's ``srwm/beta/<M>``, ``hypernet/*`` stats)."""
    for k, v in metrics.items():
        if isinstance(v, Tensor) and v.numel() != 1:
            logger.histogram(prefix + k, v.detach(), step)
        else:
            logger.scalar(prefix + k, v, step)
