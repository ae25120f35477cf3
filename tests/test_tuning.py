"""Autotuning: records land in the database (locally and through a loopback RPC tracker with two
servers, one of which is lost mid-run), a rerun measures nothing new, compile --tuning-db applies the
records and reports matches and fallbacks, and databases of another version or target are ignored."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import slimgraph
from golden_util import GraphMaker
from slimgraph.compiler import interpreter, ops
from slimgraph.compiler.driver import CompileOptions, compile_model, tune_model
from slimgraph.compiler.errors import TuningError
from slimgraph.compiler.passmanager import make_sample_inputs
from slimgraph.compiler.types import DType, TensorType

pytestmark = pytest.mark.slow
TRIALS = 4


def two_kernel_model():
    """x[8,32] -> relu(x @ W1) @ W2: two matmul kernels with static shapes."""
    g = GraphMaker()
    x = g.b.param("x", TensorType(DType.f32, (8, 32)))
    w1 = g.weight("w1", (32, 32))
    w2 = g.weight("w2", (32, 16))
    h = g(ops.RELU, g(ops.MATMUL, x, w1))
    return g.module(g(ops.MATMUL, h, w2, name="y"))


def tune(module, db, **kwargs):
    events = []
    result = tune_model(module, db, CompileOptions(), trials=TRIALS, cost_model="random",
                        on_event=lambda k, p: events.append((k, p)), **kwargs)
    return result, events


def record_lines(folder) -> int:
    path = folder / "database_tuning_record.json"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def measuring_workers() -> list[int]:
    """Live child processes of this one that run TVM's measuring workers (``tvm.exec.popen_worker``).

    Scans every ``/proc/PID/stat`` for this process as parent: unlike ``/proc/self/task/*/children`` it has no
    per-thread files, which vanish when one of TVM's threads ends between the listing and the read."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(parent) == os.getpid() and state != "Z" and b"popen_worker" in command:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("tuning")
    result, events = tune(two_kernel_model(), db)
    return db, result, events


def test_records_land_and_rerun_measures_nothing(tuned_db):
    db, result, events = tuned_db
    assert len(result["tasks"]) >= 2 and result["measured"] >= len(result["tasks"]) * TRIALS
    folder = db / result["target"]
    assert record_lines(folder) >= result["measured"]
    assert all(row["best_s"] and row["best_s"] > 0 for row in result["tasks"])
    assert all(row["default_s"] and row["default_s"] > 0 for row in result["tasks"]), "default schedules timed"
    progress = [p for k, p in events if k == "tune_progress"]
    assert progress and all({"trials", "current_s", "best_s", "elapsed_s"} <= set(p) for p in progress)
    before = record_lines(folder)
    again, _ = tune(two_kernel_model(), db)
    assert again["measured"] == 0 and all(r["skipped"] == "already tuned" for r in again["tasks"])
    assert record_lines(folder) == before
    assert measuring_workers() == [], "tuning ends its measuring processes"


def with_default_seconds(db, result, tmp_path, seconds: float):
    """A copy of the database in which every recorded default-schedule time is ``seconds``."""
    import shutil

    copy = tmp_path / f"db-{seconds}"
    shutil.copytree(db, copy)
    meta = copy / result["target"] / "slimgraph-tuning.json"
    data = json.loads(meta.read_text())
    data["default_seconds"] = {key: seconds for key in data["default_seconds"]}
    meta.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("default_seconds,applied", [(1e3, "matched"), (1e-12, "kept_default")])
def test_compile_applies_tuned_schedules_that_beat_the_default(tuned_db, tmp_path, default_seconds, applied):
    db, result, _ = tuned_db
    module = two_kernel_model()
    copy = with_default_seconds(db, result, tmp_path, default_seconds)
    out = compile_model(module, tmp_path / "art", CompileOptions(tuning_db=copy))
    report = json.loads((out / "report.json").read_text())["tuning"]
    assert len(report[applied]) == len(result["tasks"]) and "warning" not in report
    inputs = make_sample_inputs(module, seed=1)
    np.testing.assert_allclose(slimgraph.load(out)(**inputs)[0], interpreter.run(module, inputs)[0],
                               rtol=1e-4, atol=1e-4)


def test_kernels_that_keep_the_default_are_scheduled_once(tuned_db, tmp_path, monkeypatch):
    """A kernel that keeps its default schedule is built from the default-scheduled kernel the
    database made to look up its time: a compile with the database schedules no more kernels than
    one without it."""
    from slimgraph.backends.schedules import cpu

    db, result, _ = tuned_db
    calls = []
    original = cpu.schedule_prim_func
    monkeypatch.setattr(cpu, "schedule_prim_func", lambda func, target: calls.append(1) or original(func, target))
    compile_model(two_kernel_model(), tmp_path / "plain", CompileOptions())
    plain = len(calls)
    copy = with_default_seconds(db, result, tmp_path, 1e-12)
    calls.clear()
    out = compile_model(two_kernel_model(), tmp_path / "kept", CompileOptions(tuning_db=copy))
    assert len(json.loads((out / "report.json").read_text())["tuning"]["kept_default"]) == len(result["tasks"])
    assert plain > 0 and len(calls) == plain


def test_default_time_of_an_older_default_schedule_is_not_compared_and_tune_remeasures_it(tuned_db, tmp_path):
    """Default times are keyed by the default-scheduled kernel: after slimgraph's default schedules
    change, compile keeps the default (no time to compare against) until a rerun of tune measures
    the new default, and that rerun measures no new tuning records."""
    db, result, _ = tuned_db
    copy = with_default_seconds(db, result, tmp_path, 1e3)
    meta = copy / result["target"] / "slimgraph-tuning.json"
    data = json.loads(meta.read_text())
    data["default_seconds"] = {f"older-default-{key}": s for key, s in data["default_seconds"].items()}
    meta.write_text(json.dumps(data))
    module = two_kernel_model()
    report = json.loads((compile_model(module, tmp_path / "stale", CompileOptions(tuning_db=copy))
                         / "report.json").read_text())["tuning"]
    assert len(report["default_not_measured"]) == len(result["tasks"]) and not report["matched"]
    before = record_lines(copy / result["target"])
    again, _ = tune(module, copy)
    assert again["measured"] == 0 and all(row["default_s"] > 0 for row in again["tasks"])
    assert record_lines(copy / result["target"]) == before
    report = json.loads((compile_model(module, tmp_path / "fresh", CompileOptions(tuning_db=copy))
                         / "report.json").read_text())["tuning"]
    assert not report["default_not_measured"]
    assert len(report["matched"]) + len(report["kept_default"]) == len(result["tasks"])


def test_database_of_another_version_is_ignored_or_refused(tuned_db, tmp_path):
    import shutil

    db, result, _ = tuned_db
    copy = tmp_path / "old"
    shutil.copytree(db, copy)
    meta = copy / result["target"] / "slimgraph-tuning.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "slimgraph_version": "0.0.1"}))
    out = compile_model(two_kernel_model(), tmp_path / "art", CompileOptions(tuning_db=copy))
    report = json.loads((out / "report.json").read_text())["tuning"]
    assert "0.0.1" in report["warning"] and "matched" not in report
    with pytest.raises(TuningError, match="0.0.1"):
        tune(two_kernel_model(), copy)


def test_database_of_another_target_is_not_read(tuned_db, tmp_path):
    db, _, _ = tuned_db
    out = compile_model(two_kernel_model(), tmp_path / "art", CompileOptions(tuning_db=db, mcpu="haswell"))
    report = json.loads((out / "report.json").read_text())["tuning"]
    assert "no records for target" in report["warning"]


def test_symbolic_kernels_are_left_to_default_schedules(tmp_path):
    result, _ = tune("mlp", tmp_path / "db")
    assert result["measured"] == 0 and all("symbolic" in r["skipped"] for r in result["tasks"])


def test_unreachable_tracker_fails_fast_naming_it(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", "tune", "mlp", "--db", str(tmp_path / "db"),
                           "--rpc-tracker", "127.0.0.1:1", "--rpc-key", "k", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - start < 60
    assert proc.returncode == TuningError.exit_code and "Traceback" not in proc.stderr
    assert "127.0.0.1:1" in json.loads(proc.stdout)["error"]["message"]
    assert not (tmp_path / "db").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args) -> subprocess.Popen:
    """A TVM tool in a process group of its own, so ``stop`` also ends what it starts (an RPC server's
    session workers)."""
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TVM_NUM_THREADS": "1"}, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill a process started by ``start`` with its whole process group."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_servers(port: int, key: str, count: int, timeout: float = 90) -> None:
    from tvm.rpc import connect_tracker

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            summary = connect_tracker("127.0.0.1", port).summary()
            if sum(1 for s in summary.get("server_info", []) if s.get("key", "").endswith(key)) >= count:
                return
        except Exception:  # noqa: BLE001 - the tracker is still starting
            pass
        time.sleep(1)
    raise AssertionError(f"{count} RPC servers did not register with the tracker on port {port}")


def test_rpc_loopback_with_a_server_lost_mid_run(tmp_path):
    port, key = free_port(), "slimgraph-test"
    tracker = start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))
    servers = []
    for _ in range(2):
        server_port = free_port()
        servers.append(start("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", key, "--host",
                             "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1)))
    try:
        wait_for_servers(port, key, 2)
        lost = []

        def on_event(kind, payload):
            if kind == "tune_task_end" and not lost:      # the first task is done: lose a server
                stop(servers[0])
                lost.append(payload["task"])

        result = tune_model(two_kernel_model(), tmp_path / "db", CompileOptions(), trials=TRIALS,
                            cost_model="random", rpc_tracker=f"127.0.0.1:{port}", rpc_key=key, on_event=on_event)
        assert lost and result["measured"] >= 2 * TRIALS
        assert record_lines(tmp_path / "db" / result["target"]) >= result["measured"]
        first = next(r for r in result["tasks"] if r["task"] == lost[0])
        assert first["best_s"] and first["best_s"] > 0
    finally:
        for proc in servers + [tracker]:
            stop(proc)
