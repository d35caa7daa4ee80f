"""``--storage``: trials in Optuna's RDB storage (SQLite and a real PostgreSQL 15 server).

The PostgreSQL tests start their own server: ``initdb`` and ``postgres`` in a temporary
directory, listening on 127.0.0.1 only (no Unix socket outside the temp dir), stopped by its
pid when the module's tests finish, also when they fail. They are skipped, naming what is
missing, when the PostgreSQL binaries, the psycopg2 driver, optuna-dashboard or Chromium are
not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from selfref.budget import Budget  # noqa: E402
from selfref.execution.optuna_storage import OptunaStore, load_comparison  # noqa: E402
from selfref.methods import make  # noqa: E402
from selfref.search_space import default_space  # noqa: E402
from selfref.tasks import make as make_task  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of our own on 127.0.0.1:<free port>; yields its SQLAlchemy URL."""
    initdb, server = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or server is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (selfref[postgres])")
    root = tmp_path_factory.mktemp("pg")
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    user: str | None = None
    ids: dict[str, object] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        user = "postgres" if _has_user("postgres") else "nobody"
        pw = pwd.getpwnam(user)
        ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        for p in (root, data, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        for p in root.parents:  # pytest's temp dirs are 0700: let the server user traverse
            if not str(p).startswith(str(tmp_path_factory.getbasetemp().parent)):
                break
            os.chmod(p, os.stat(p).st_mode | 0o001)
    made = subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True,
        cwd=root,
        **ids,
    )
    if made.returncode != 0:
        raise RuntimeError(f"initdb failed: {made.stderr.decode()[-2000:]}")
    port = _free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [
            server,
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            "fsync=off",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
        **ids,
    )
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (root / "server.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown, by pid
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _studies(url: str) -> dict[str, list]:
    storage = optuna.storages.RDBStorage(url)
    return {
        s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
        for s in optuna.get_all_study_summaries(storage)
    }


def test_search_trials_go_to_the_database_and_resume_from_it_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    task = make_task("quadratic")
    full = make("random", workers=0).run(task, Budget(400, 50), seed=3)  # 8 trials
    half = make("random", workers=0, storage=url).run(task, Budget(200, 50), seed=3)
    trials = _studies(url)["random-s3"]
    states = [t.state.name for t in trials]
    assert len(trials) == half.extra["trials"] >= 4
    assert states.count("COMPLETE") == half.extra["trials_ok"]
    assert states.count("FAIL") == half.extra["trials_diverged"] + half.extra["trials_failed"]
    assert all(t.user_attrs["method"] == "random" and t.user_attrs["seed"] == 3 for t in trials)
    assert set(trials[0].params) == {"lr", "momentum", "weight_decay"}
    resumed = make("random", workers=0, storage=url).run(task, Budget(400, 50), seed=3)
    assert resumed.extra["trials_resumed"] == half.extra["trials"]
    assert resumed.extra["trials"] == full.extra["trials"]
    assert resumed.best_hparams == full.best_hparams and resumed.val_loss == full.val_loss
    assert len(_studies(url)["random-s3"]) == full.extra["trials"]


def test_multifidelity_trials_carry_rungs_and_pruned_states(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hb.db'}"
    res = make("asha", workers=0, storage=url).run(make_task("quadratic"), Budget(800, 54), seed=0)
    trials = _studies(url)["asha-s0"]
    states = [t.state.name for t in trials]
    assert len(trials) == res.extra["trials"]
    assert states.count("PRUNED") == res.extra["trials_pruned"] > 0
    assert states.count("COMPLETE") == res.extra["trials_completed"] > 0
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert all(sorted(t.intermediate_values)[-1] == 54 for t in done)
    assert min(t.value for t in done) == pytest.approx(res.val_loss)


def test_a_pruned_configuration_promoted_on_resume_continues_in_a_new_trial(
    tmp_path: Path,
) -> None:
    """A larger budget on resume may promote a configuration the first run set PRUNED; Optuna
    cannot reopen a finished trial, so it continues in a new one, and the study still reads
    back exactly as an uninterrupted run (from the database alone)."""
    url = f"sqlite:///{tmp_path / 'hb.db'}"
    task = make_task("quadratic")
    full = make("asha", workers=0).run(task, Budget(1200, 54), seed=2)
    make("asha", workers=0, storage=url).run(task, Budget(500, 54), seed=2)
    resumed = make("asha", workers=0, storage=url).run(task, Budget(1200, 54), seed=2)
    assert resumed.extra["trials_resumed_rungs"] > 0
    assert resumed.grad_evals == full.grad_evals and resumed.val_loss == full.val_loss
    trials = _studies(url)["asha-s2"]
    continued = [t for t in trials if "continues" in t.user_attrs]
    assert continued, "no pruned configuration was promoted after the resume"
    by_number = {t.number: t for t in trials}
    for t in continued:
        before = by_number[t.user_attrs["continues"]]
        assert before.state.name == "PRUNED"
        assert before.user_attrs["selfref_trial"] == t.user_attrs["selfref_trial"]
    store = OptunaStore(url, "asha-s2", default_space(), "asha", 2)
    assert [r["index"] for r in store.load()] == list(range(resumed.extra["rungs_run"]))


def test_a_jsonl_study_resumed_with_storage_copies_its_trials_to_the_database(
    tmp_path: Path,
) -> None:
    from selfref.runs import RunDir

    url = f"sqlite:///{tmp_path / 'late.db'}"
    task = make_task("quadratic")
    run = RunDir.create(tmp_path, "test", "random")
    half = make("random", workers=0, run_dir=run).run(task, Budget(200, 50), seed=0)
    resumed = make("random", workers=0, run_dir=run, storage=url).run(task, Budget(400, 50))
    assert resumed.extra["trials_resumed"] == half.extra["trials"] > 0
    trials = _studies(url)[f"{run.path.name}/random-s0"]
    assert len(trials) == resumed.extra["trials"] == len(run.read_trials())


@pytest.mark.slow
def test_compare_cli_storage_and_resume_from_the_database_alone(tmp_path: Path, run_cli) -> None:
    url = f"sqlite:///{tmp_path / 'cmp.db'}"
    args = ["compare", "--task", "quadratic", "--methods", "grid,asha", "--seeds", "0",
            "--budget", "400", "--steps-per-trial", "50", "--workers", "0",
            "--storage", url]  # fmt: skip
    first = run_cli(*args, "--logdir", str(tmp_path / "a"))
    assert first.code == 0, first.err
    (run,) = (tmp_path / "a" / "compare").iterdir()
    names = set(_studies(url))
    assert {f"{run.name}/grid-s0", f"{run.name}/asha-s0", f"{run.name}/_comparison"} <= names
    config, results = load_comparison(url, run.name)
    assert config["methods"] == ["grid", "asha"] and len(results) == 2
    shutil.rmtree(run)  # nothing left but the database
    again = run_cli(
        "compare", "--storage", url, "--resume", run.name, "--logdir", str(tmp_path / "b")
    )
    assert again.code == 0, again.err
    stored = json.loads((tmp_path / "b" / "compare" / run.name / "results.json").read_text())
    assert [(r["method"], r["val_loss"]) for r in stored] == [
        (r["method"], r["val_loss"]) for r in results
    ]
    bad = run_cli("compare", "--storage", "mysql://x", "--logdir", str(tmp_path / "c"))
    assert bad.code == 2 and "unknown storage URL 'mysql://x'" in bad.err


_WRITER = """
import sys
from selfref.execution.optuna_storage import OptunaStore
from selfref.search_space import default_space
url, proc = sys.argv[1], int(sys.argv[2])
store = OptunaStore(url, "shared", default_space(), "random", proc)
for i in range(15):
    store.append({"index": 1000 * proc + i, "hparams": {"lr": 0.01 * (i + 1), "momentum": 0.5,
                  "weight_decay": 1e-4}, "status": "ok", "val_loss": proc + i / 100,
                  "grad_evals": 10})
"""


@pytest.mark.slow
def test_postgres_two_processes_one_study_and_the_dashboard(
    postgres: str, tmp_path: Path, run_cli
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, postgres, str(p)], env=env) for p in (1, 2)
    ]
    try:
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    store = OptunaStore(postgres, "shared", default_space(), "random", 0)
    records = store.load()
    assert sorted(r["index"] for r in records) == sorted(
        [1000 + i for i in range(15)] + [2000 + i for i in range(15)]
    )
    assert len({t.number for t in store.optuna_study.get_trials()}) == 30

    out = run_cli("compare", "--task", "quadratic", "--methods", "random,hyperband", "--seeds",
                  "0", "--budget", "400", "--steps-per-trial", "54", "--workers", "0",
                  "--storage", postgres, "--logdir", str(tmp_path / "logs"))  # fmt: skip
    assert out.code == 0, out.err
    (run,) = (tmp_path / "logs" / "compare").iterdir()
    trials = _studies(postgres)[f"{run.name}/random-s0"]
    assert len(trials) > 0
    states = [t.state.name.capitalize() for t in sorted(trials, key=lambda t: t.number)]
    _dashboard_lists_trials(postgres, f"{run.name}/random-s0", states, tmp_path)


def _dashboard_lists_trials(url: str, study: str, states: list[str], tmp_path: Path) -> None:
    """optuna-dashboard on ``url`` lists the study's trials: through its API and on the page
    headless Chromium renders (a screenshot, and the DOM after the page's scripts ran)."""
    n_trials = len(states)
    dashboard = shutil.which("optuna-dashboard") or str(
        Path(sys.executable).parent / "optuna-dashboard"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not Path(dashboard).is_file():
        pytest.skip("optuna-dashboard is not installed (selfref[dashboard])")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    port = _free_port()
    proc = subprocess.Popen(
        [dashboard, url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.3)
        (sid,) = [s["study_id"] for s in studies if s["study_name"] == study]
        with urllib.request.urlopen(f"{base}/api/studies/{sid}?after=0", timeout=30) as r:
            detail = json.loads(r.read())
        assert sorted(t["number"] for t in detail["trials"]) == list(range(n_trials))
        assert [t["state"] for t in sorted(detail["trials"], key=lambda t: t["number"])] == states
        profile = tmp_path / "chromium-profile"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--virtual-time-budget=15000", "--window-size=1400,1000"]  # fmt: skip
        page = f"{base}/dashboard/studies/{sid}/trials"
        shot = tmp_path / "study.png"
        subprocess.run(
            [chromium, *flags, f"--screenshot={shot}", page],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert shot.is_file() and shot.stat().st_size > 10_000
        dom = subprocess.run(
            [chromium, *flags, "--dump-dom", page], check=True, capture_output=True, timeout=120
        ).stdout.decode()
        keep = os.environ.get("SELFREF_KEEP_SCREENSHOT")
        if keep:
            Path(keep + ".html").write_text(dom)
        assert study in dom
        for i in range(n_trials):
            assert f"Trial {i}" in dom or f"#{i}" in dom, f"trial {i} not listed"
        keep = os.environ.get("SELFREF_KEEP_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
            Path(keep + ".html").write_text(dom)
    finally:
        proc.terminate()  # by pid
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
