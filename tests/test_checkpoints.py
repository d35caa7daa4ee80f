"""The checkpoint format: a pickle that would run code is refused, never executed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfref import checkpoints


class _Payload:
    """Unpickling this calls ``os.system`` (the attack the review reproduced)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A torch file whose pickle runs ``touch marker`` when loaded unsafely."""
    torch.save({"format": "selfref-meta/1", "net": _Payload(marker)}, path)
    return path


def test_roundtrip_plain_containers(tmp_path: Path) -> None:
    obj = {"format": "x/1", "t": torch.arange(3.0), "cfg": {"a": (1, 2), "b": [None, True]}}
    p = checkpoints.save(obj, tmp_path / "a" / "ck.pt")
    back = checkpoints.load(p, formats="x/1")
    assert torch.equal(back["t"], obj["t"]) and back["cfg"] == obj["cfg"]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="refusing to load"):
        checkpoints.load(p)
    assert not marker.exists()


def test_the_attack_is_real(tmp_path: Path) -> None:
    """An unsafe load of the same file does run the payload (so the test above means something)."""
    marker = tmp_path / "pwned"
    p = malicious_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_corrupt_missing_and_wrong_format(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        checkpoints.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load(tmp_path / "nope.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        checkpoints.load(tmp_path / "list.pt")
    checkpoints.save({"format": "other/1"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected selfref-meta/1"):
        checkpoints.load(tmp_path / "other.pt", formats="selfref-meta/1")


def test_learned_optimizer_refuses_malicious_checkpoint(tmp_path: Path) -> None:
    import selfref

    marker = tmp_path / "pwned"
    p = malicious_checkpoint(tmp_path / "evil.pt", marker)
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="refusing to load"):
        selfref.LearnedOptimizer(model.parameters(), checkpoint=p)
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--methods", "selfref", "--checkpoint", "{ck}", "--seeds", "0"],
        ["meta-train", "--resume", "{run}"],
    ],
)
def test_cli_refuses_malicious_checkpoint(tmp_path: Path, argv: list[str]) -> None:
    marker = tmp_path / "pwned"
    ck = malicious_checkpoint(tmp_path / "evil.pt", marker)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    spec = {"task": "quadratic", "core": "lstm", "task_options": {}, "core_options": {},
            "analyzer": {}, "evaluation": {}, "meta": {}}  # fmt: skip
    (run / "config.json").write_text(json.dumps({"command": "meta-train", "spec": spec}))
    os.link(ck, run / "checkpoints" / "last.pt")
    args = [a.format(ck=ck, run=run) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "selfref.cli", *args, "--logdir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "refusing to load" in lines[0]
    assert not marker.exists()
