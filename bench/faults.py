"""Faults, tried as a user would: kill -9 + resume, SIGTERM / Ctrl-C, parallel first starts on a fresh SQLite file
and on PostgreSQL (directly and through an MLflow server), bad inputs.

    python bench/faults.py                                   # the sizes of the README table (about an hour here)
    python bench/faults.py --kills 4 --parallel 4 --writers 8 --only kills parallel

The kill/resume part runs every method of conf/pruning/ (a new method joins without change). The PostgreSQL parts
need PostgreSQL's binaries (Debian: apt-get install postgresql) and are skipped without them.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from prunelab.tracking.runs.record import FINAL_METRICS
from prunelab.tracking.server.store import schema_problems
from prunelab.tracking.server.teamserver import mlflow_server, postgres, postgres_bin

ROOT = Path(__file__).resolve().parents[1]

RUN = [
    "data=mnist5k",
    "model=lenet5",
    "dense.epochs=2",
    "finetune.epochs=4",
    "logger.log_model=false",
    "measure.latency=false",
    "num_threads=1",
]
SMALL = [
    "data=digits",
    "model=lenet300",
    "dense.epochs=1",
    "finetune.epochs=2",
    "logger.log_model=false",
    "measure.latency=false",
    "num_threads=1",
]
CURVES = ("train/loss", "val/acc", "train/sparsity")


def _train(root: Path, *overrides: str, job: str = "job", wait: bool = True, env: dict | None = None):
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        *overrides,
        f"paths.root_dir={root}",
        f"paths.cache_dir={root.parent / 'dense_cache'}",
        f"hydra.run.dir={root / job}",
    ]
    env = {**os.environ, **(env or {})}
    if not (env or {}).get("MLFLOW_TRACKING_URI"):
        env.pop("MLFLOW_TRACKING_URI", None)
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env)
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")


def _masks(ckpt: Path) -> dict[str, torch.Tensor]:
    callbacks = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    return next(v for k, v in callbacks.items() if "method" in k)["masks"]


def _points(client: mlflow.MlflowClient, run_id: str) -> set[tuple[str, int]]:
    return {(k, m.step) for k in CURVES for m in client.get_metric_history(run_id, k)}


def _wait_for(path: Path, proc: subprocess.Popen) -> float:
    """Until ``path`` (a glob pattern) exists; returns when."""
    while not list(path.parent.glob(path.name)):
        if proc.poll() is not None:
            raise RuntimeError(f"run ended before {path.name} appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    return time.monotonic()


def kills(work: Path, trials: int, rng: random.Random) -> None:
    """kill -9 at a random moment of the pruning fit, then resume from last.ckpt."""
    methods = sorted(p.stem for p in (ROOT / "conf" / "pruning").glob("*.yaml") if p.stem != "none")
    refs = {}
    for method in methods:  # uninterrupted reference: final masks, curve points, fit duration
        root = work / f"ref-{method}"
        proc = _train(root, *RUN, f"pruning={method}", wait=False)
        start = _wait_for(root / "job" / "checkpoints" / "last.ckpt", proc)
        assert proc.wait() == 0, proc.stderr.read()[-3000:]
        client = _client(root)
        (run,) = client.search_runs(["1"])
        refs[method] = (
            _masks(root / "job" / "checkpoints" / "last.ckpt"),
            _points(client, run.info.run_id),
            time.monotonic() - start,
        )
    survived = identical = lost = one_run = landed = 0
    for i in range(trials):
        method = methods[i % len(methods)]
        masks, points, fit_seconds = refs[method]
        root = work / f"kill-{i}"
        proc = _train(root, *RUN, f"pruning={method}", wait=False)
        ckpt = root / "job" / "checkpoints" / "last.ckpt"
        _wait_for(ckpt, proc)
        time.sleep(rng.uniform(0.0, 0.8 * fit_seconds))
        inside = proc.poll() is None
        landed += inside
        proc.kill()
        proc.wait()
        resumed = _train(root, *RUN, f"pruning={method}", f"ckpt_path={ckpt}", job="job-resumed")
        client = _client(root)
        runs = client.search_runs(["1"])
        ok = resumed.returncode == 0 and len(runs) == 1 and runs[0].info.status == "FINISHED"
        same = ok and all(torch.equal(masks[k], v) for k, v in _masks(ckpt).items())
        missing = len(points - _points(client, runs[0].info.run_id)) if runs else len(points)
        survived, identical, lost, one_run = survived + ok, identical + same, lost + missing, one_run + (len(runs) == 1)
        print(
            f"  kill {i + 1:2d}: {method:10s} killed {'in the fit' if inside else 'after it'}, resumed "
            f"{'FINISHED' if ok else 'FAILED'}, masks {'identical' if same else 'DIFFER'}, {missing} points lost",
            flush=True,
        )
    running = sum(
        len(_client(work / f"kill-{i}").search_runs(["1"], "attributes.status = 'RUNNING'")) for i in range(trials)
    )
    print(
        f"kills survived {survived}/{trials} (kill landed inside the fit {landed}/{trials}; methods "
        f"{', '.join(methods)}), masks identical {identical}/{trials}, one MLflow run each {one_run}/{trials}, "
        f"left RUNNING {running}, metric points lost {lost}"
    )


def signals(work: Path) -> None:
    """SIGTERM and SIGINT (Ctrl-C) in the middle of the fit: exit status, seconds to exit, run status."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        root = work / f"signal-{signum.name}"
        proc = _train(root, *RUN, wait=False)
        _wait_for(root / "job" / "checkpoints" / "epoch=0-*.ckpt", proc)
        sent = time.monotonic()
        os.killpg(proc.pid, signum)
        code = proc.wait()
        seconds = time.monotonic() - sent
        (run,) = _client(root).search_runs(["1"])
        print(
            f"{signum.name}: exit status {code} after {seconds:.1f} s, run {run.info.status} "
            f"({run.data.tags.get('failure_reason')}), checkpoint {run.data.tags.get('prunelab.checkpoint')}"
        )


_RAW_FIRST_USE = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
client = MlflowClient(tracking_uri=sys.argv[1])
if client.get_experiment_by_name("prunelab") is None:
    client.create_experiment("prunelab")
"""
_OUR_FIRST_USE = (
    _RAW_FIRST_USE.split("client =")[0]
    + """
from prunelab.tracking.server.store import ensure_experiment
ensure_experiment(sys.argv[1], "prunelab")
"""
)


def _first_use(uri: str, n: int, script: str, go: Path) -> int:
    """Processes that touch a fresh store at the same moment; returns how many exited 0."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, str(go)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for _ in range(n)
    ]
    for p in procs:
        p.stdout.readline()
    go.touch()
    return sum(p.wait() == 0 for p in procs)


def parallel_sqlite(work: Path, n: int) -> None:
    raw = work / "raw" / "mlflow.db"
    raw.parent.mkdir(parents=True)
    ok = _first_use(f"sqlite:///{raw}", n, _RAW_FIRST_USE, work / "go-raw")
    print(
        f"plain MLflow, {n} processes on a fresh SQLite file: {ok}/{n} finished, store afterwards: "
        f"{'; '.join(schema_problems(raw)) or 'sound'}"
    )
    root = work / "parallel"
    start = time.monotonic()
    procs = [_train(root, *SMALL, f"seed={i % 3}", job=f"job-{i}", wait=False) for i in range(n)]
    codes = [p.wait() for p in procs]
    client = _client(root)
    experiments = [e.name for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([client.get_experiment_by_name("prunelab").experiment_id])
    expected = len(FINAL_METRICS) + 3 * 2  # final metrics + 3 curves × 2 epochs
    got = [len(set(FINAL_METRICS) & set(r.data.metrics)) + len(_points(client, r.info.run_id)) for r in runs]
    lost = expected * (n - len(runs)) + sum(expected - g for g in got)
    print(
        f"parallel starts, SQLite: {codes.count(0)}/{n} training processes finished on a fresh file in "
        f"{time.monotonic() - start:.0f} s; {len(runs)} runs ({sum(r.info.status == 'FINISHED' for r in runs)} "
        f"FINISHED), metric values lost {lost} of {expected * n}; "
        f"experiments: {experiments}"
    )


# MLflow only (no torch: 32 of them must fit in memory); get-or-create the experiment as ensure_experiment does
_WRITER = """
import sys, json
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
record = json.load(open(sys.argv[2]))
client = MlflowClient(tracking_uri=sys.argv[1])
exp = client.get_experiment_by_name("prunelab")
try:
    exp_id = exp.experiment_id if exp else client.create_experiment("prunelab")
except MlflowException:  # another writer created it meanwhile
    exp_id = client.get_experiment_by_name("prunelab").experiment_id
run = client.create_run(exp_id, tags={"writer": sys.argv[3]})
params = [Param(k, v) for k, v in record["params"].items()]
for i in range(0, len(params), 100):
    client.log_batch(run.info.run_id, params=params[i:i + 100])
for key, step, value, timestamp in record["metrics"]:  # one call per point, as a training loop logs them
    client.log_batch(run.info.run_id, metrics=[Metric(key, value, timestamp, step)])
client.set_terminated(run.info.run_id)
"""


def postgres_parts(work: Path, writers: int, first_users: int) -> None:
    import json

    if postgres_bin() is None:
        print("PostgreSQL: skipped (no initdb / pg_ctl; Debian: apt-get install postgresql)")
        return
    with postgres() as db:
        ok = _first_use(db, first_users, _OUR_FIRST_USE, work / "go-pg")
        print(
            f"parallel starts, PostgreSQL database: {ok}/{first_users} processes finished their first use of a "
            "fresh database (schema + experiment)"
        )
    # a full run's record: every param and every metric point of one real run
    root = work / "record"
    assert _train(root, *SMALL).returncode == 0
    client = _client(root)
    (run,) = client.search_runs(["1"])
    metrics = [
        (k, m.step, m.value, m.timestamp)
        for k in run.data.metrics
        for m in client.get_metric_history(run.info.run_id, k)
    ]
    (work / "record.json").write_text(json.dumps({"params": run.data.params, "metrics": metrics}))
    with postgres() as db, mlflow_server(db, work / "artifacts", workers=4) as url:
        start = time.monotonic()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _WRITER, url, str(work / "record.json"), str(i)], stderr=subprocess.PIPE
            )
            for i in range(writers)
        ]
        outcomes = [p.communicate() for p in procs]
        codes = [p.returncode for p in procs]
        seconds = time.monotonic() - start
        for p, (_, err) in zip(procs, outcomes):
            if p.returncode:
                print(f"  writer failed (status {p.returncode}): {err.decode()[-800:]}")
        server = mlflow.MlflowClient(tracking_uri=url)
        experiments = [e.name for e in server.search_experiments() if e.name != "Default"]
        runs = server.search_runs([server.get_experiment_by_name("prunelab").experiment_id], max_results=1000)
        lost = sum(
            len(metrics)
            - sum(len(server.get_metric_history(r.info.run_id, k)) for k in run.data.metrics)
            + len(run.data.params)
            - len(r.data.params)
            for r in runs
        )
    print(
        f"parallel starts, PostgreSQL behind an MLflow server: {codes.count(0)}/{writers} writers finished in "
        f"{seconds:.0f} s, each logging {len(run.data.params)} params and {len(metrics)} metric points; "
        f"{len(runs)} runs, values lost {lost}; experiments: {experiments}"
    )


def bad_inputs(work: Path) -> None:
    ckpt_root = work / "bad-ckpt"
    assert _train(ckpt_root, *SMALL, "pruning.compression=4").returncode == 0
    ckpt = ckpt_root / "job" / "checkpoints" / "last.ckpt"
    (work / "notes.ckpt").write_text("not a checkpoint")
    cases = [
        ("dense.epochs", "dense.epochs=-1"),
        ("dense.epochs", "dense.epochs=0"),
        ("dense.epochs", "dense.epochs=1.5"),
        ("finetune.epochs", "finetune.epochs=-1"),
        ("finetune.epochs", "finetune.epochs=0"),
        ("finetune.epochs", "finetune.epochs=two"),
        ("pruning.compression", "pruning.compression=1e9"),
        ("pruning.compression", "pruning.compression=1"),
        ("pruning.compression", "pruning.compression=abc"),
        ("pruning.compression", "pruning.granularity=filter pruning.compression=5000"),
        ("seed", "seed=abc"),
        ("pruning.mode", "pruning.mode=sometimes"),
        ("rows", "pruning.granularity=rows"),
        ("fc9", "pruning.layers=[fc1,fc9]"),
        ("batch_size", "data.batch_size=0"),
        ("logger.connect_timeout", "logger.connect_timeout=0"),
        ("data/imagenet", "data=imagenet"),
        ("compresion", "pruning.compresion=4"),
        ("ckpt_path", "ckpt_path=/nowhere/last.ckpt"),
        ("ckpt_path", f"ckpt_path={work / 'notes.ckpt'}"),
        ("ckpt_path", "pruning=none ckpt_path=/nowhere/last.ckpt"),
        ("ckpt_path", f"pruning=admm pruning.compression=4 ckpt_path={ckpt}"),
        ("ckpt_path", f"pruning.granularity=filter pruning.compression=4 ckpt_path={ckpt}"),
        ("ckpt_path", f"model=lenet5 pruning.compression=4 ckpt_path={ckpt}"),
        ("ckpt_path", f"finetune.epochs=3 pruning.compression=4 ckpt_path={ckpt}"),
        ("seed", "seed=-1"),
        ("num_threads", "num_threads=-1"),
        ("num_threads", "num_threads=0"),
        ("finetune.optimizer", "finetune.optimizer.lr=-1"),
        ("dense.optimizer", "dense.optimizer.lr=-1"),
        ("trainer.strategy", "trainer.strategy=ddp_spawn"),
        ("MLFLOW_TRACKING_URI", "env:MLFLOW_TRACKING_URI=garbage://nowhere"),
        ("PRUNELAB_ROOT", "env:PRUNELAB_ROOT=/proc/forbidden"),
    ]
    rejected = 0
    for i, (key, overrides) in enumerate(cases):
        root = work / f"bad-{i}"
        env = dict([overrides.removeprefix("env:").split("=", 1)]) if overrides.startswith("env:") else None
        given = [] if env else overrides.split()
        base = [o for o in SMALL if o.split("=")[0] not in {x.split("=")[0] for x in given}]
        start = time.monotonic()
        proc = _train(root, *base, *given, env=env)
        seconds = time.monotonic() - start
        named = key in proc.stderr
        clean = not (root / "outputs").exists()
        ok = proc.returncode != 0 and named and clean
        rejected += ok
        last = [line for line in proc.stderr.splitlines() if key in line][-1:] or [""]
        print(
            f"  {'rejected' if ok else 'NOT REJECTED'} {seconds:5.1f} s  {overrides.replace(str(work), '…')}: "
            f"{last[0][:150].replace(str(work), '…')}" + ("" if clean else "  [store created]"),
            flush=True,
        )
    print(f"bad inputs rejected {rejected}/{len(cases)} (non-zero exit, key named, no store / experiment / run)")


def ddp_kill(work: Path) -> None:
    """kill -9 of rank 1 of a 2-process DDP run (CPU, gloo): seconds until every process is gone, the run's status."""
    import psutil

    root = work / "ddp-kill"
    proc = _train(
        root, *SMALL, "finetune.epochs=20", "trainer=ddp", "trainer.accelerator=cpu", "num_threads=1", wait=False
    )
    _wait_for(root / "job" / "checkpoints" / "last.ckpt", proc)
    time.sleep(2)
    rank1 = next(c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("LOCAL_RANK") == "1")
    rank1.kill()
    start = time.monotonic()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    gone = time.monotonic() - start
    (run,) = _client(root).search_runs(["1"])
    print(
        f"  kill -9 of rank 1: every process gone in {gone:.1f} s, exit {proc.returncode}, run {run.info.status} "
        f"({run.data.tags.get('failure_reason', '')[:100]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=12, help="training processes started at once (SQLite)")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writers on the PostgreSQL server")
    parser.add_argument("--only", nargs="*", default=["kills", "signals", "parallel", "postgres", "bad", "ddp"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"MLflow {mlflow.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="prunelab-faults-") as tmp:
        work = Path(tmp)
        steps = {
            "bad": lambda: bad_inputs(work),
            "parallel": lambda: parallel_sqlite(work, args.parallel),
            "postgres": lambda: postgres_parts(work, args.writers, 8),
            "signals": lambda: signals(work),
            "kills": lambda: kills(work, args.kills, random.Random(args.seed)),
            "ddp": lambda: ddp_kill(work),
        }
        for name in args.only:
            start = time.monotonic()
            steps[name]()
            print(f"[{name}: {time.monotonic() - start:.0f} s]\n", flush=True)


if __name__ == "__main__":
    main()
