"""Autotuning with TVM MetaSchedule: ``slimgraph tune`` writes a database, ``compile --tuning-db`` reads it.

Tasks. A model is optimized and lowered exactly as ``compile`` does, up to ``FuseTIR``: one
unscheduled TIR kernel per slimgraph-fused function. Kernels are keyed by their structural hash,
so identical kernels (the same layer repeated, the same GEMM in two models) are one task.

Database. ``DIR/<target key>/`` holds MetaSchedule's JSON database (workloads + tuning records,
appended record by record as measurements finish, so an interrupted run loses nothing measured) and
``slimgraph-tuning.json`` naming the slimgraph version and the target spec it was tuned for. A
directory for another target is never read (each target has its own key); one written by another
slimgraph version is ignored with a warning, since its kernels may no longer be the ones compiled.

Kernels with a symbolic dim (T left free) are not tuned: MetaSchedule's search spaces assume static
loop extents. Tune and compile with ``--shape input_ids=1x128`` for tuned kernels.

Resuming. A task whose workload already has ``trials`` records is not tuned again; otherwise it gets
the missing trials. A search that ends short of ``trials`` (a small kernel whose space holds fewer
distinct schedules) is marked exhausted and not searched again. A rerun on a finished database
measures nothing.

Measuring. Locally (``LocalBuilder`` + ``LocalRunner``) or on devices registered with a TVM RPC
tracker (``--rpc-tracker HOST:PORT --rpc-key KEY``), the engine of tuning farms; an unreachable
tracker fails at once, naming the address. Failed measurements (a server lost mid-run) are recorded
as failures by MetaSchedule and tuning continues with the servers left.

Baseline. Each task's kernel is also measured once with the target's default (untuned) schedule,
by the same builder and runner, and that time is kept in ``slimgraph-tuning.json``: a search that
found nothing faster within its trials must not make the build slower. The time is keyed by the
default-scheduled kernel itself, so when slimgraph's default schedules change, the old time no
longer matches and the next ``tune`` run measures the new default (and nothing else).

Applying. ``tuned_schedules_pass`` gives each kernel found in the database its best schedule when
that beats the recorded default, and counts matches; the target's default schedules handle the
rest: fallbacks (no records), ``kept_default`` (the default measured faster) and
``default_not_measured`` (records, but no time for today's default schedule: comparing against
nothing could make the build slower, so the default stays until ``tune`` measures it).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from slimgraph import __version__
from slimgraph.backends.targets import TargetSpec, family_of
from slimgraph.compiler.errors import TuningError

META_FILE = "slimgraph-tuning.json"
BUILD_TIMEOUT_S = 180     # a builder worker imports TVM first: slow on a loaded 2-core machine
RUN_TIMEOUT_S = 60
SCHEDULED_ATTR = "tirx.is_scheduled"
EventFn = Callable[[str, dict], None]


def target_key(spec: TargetSpec) -> str:
    """Directory name of a target's records: its family, CPU/GPU model, features and cores."""
    parts = [spec.name, spec.gpu_arch or spec.mcpu or spec.arch, *(a.lstrip("+") for a in spec.mattr),
             f"{spec.num_cores}c", *(["fp16"] if spec.fp16 else [])]
    return "-".join(p for p in parts if p)


def task_module(func: tirx.PrimFunc) -> tvm.IRModule:
    """A kernel as MetaSchedule keys it: one ``main`` function, noalias."""
    func = func.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": func})


@dataclass
class TuningDatabase:
    """The records of one target inside a tuning directory."""

    root: Path
    spec: TargetSpec
    usable: bool = True
    warning: str | None = None
    _db: ms.database.JSONDatabase | None = field(default=None, repr=False)
    _defaults: dict[str, tirx.PrimFunc] = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / target_key(self.spec)

    @classmethod
    def open(cls, root: str | Path, spec: TargetSpec, *, create: bool) -> "TuningDatabase":
        db = cls(Path(root), spec)
        meta = db.folder / META_FILE
        if not meta.is_file():
            if not create:
                db.usable, db.warning = False, f"{db.root} has no records for target {target_key(spec)}"
                return db
            db.folder.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"slimgraph_version": __version__, "target": spec.to_dict()}, indent=1))
        recorded = json.loads(meta.read_text())
        if recorded.get("slimgraph_version") != __version__:
            db.usable = False
            db.warning = (f"{db.folder} was tuned by slimgraph {recorded.get('slimgraph_version')}, this is "
                          f"{__version__}: its records are ignored")
        elif TargetSpec.from_dict(recorded["target"]) != spec:
            db.usable, db.warning = False, f"{db.folder} was tuned for another target: its records are ignored"
        return db

    @property
    def ms_database(self) -> ms.database.JSONDatabase:
        if self._db is None:
            self._db = ms.database.JSONDatabase(work_dir=str(self.folder), module_equality="structural")
        return self._db

    def records_for(self, func: tirx.PrimFunc) -> int:
        mod = task_module(func)
        if not self.ms_database.has_workload(mod):
            return 0
        return len(self.ms_database.get_top_k(self.ms_database.commit_workload(mod), 1 << 20))

    def best_seconds(self, func: tirx.PrimFunc) -> float | None:
        mod = task_module(func)
        if not self.ms_database.has_workload(mod):
            return None
        top = self.ms_database.get_top_k(self.ms_database.commit_workload(mod), 1)
        if not top or not top[0].run_secs:
            return None
        return mean_seconds(top[0].run_secs)

    @property
    def _meta(self) -> Path:
        return self.folder / META_FILE

    def default_scheduled(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        """``func`` under the target's default schedule as slimgraph compiles it today (made once)."""
        key = workload_key(func)
        if key not in self._defaults:
            self._defaults[key] = family_of(self.spec).default_schedule(func, self.spec)
        return self._defaults[key]

    def default_seconds(self, func: tirx.PrimFunc) -> float | None:
        """The recorded time of ``func`` under today's default schedule (None: never measured)."""
        key = workload_key(self.default_scheduled(func))
        return json.loads(self._meta.read_text()).get("default_seconds", {}).get(key)

    def record_default(self, func: tirx.PrimFunc, seconds: float) -> None:
        self._set("default_seconds", workload_key(self.default_scheduled(func)), seconds)

    def exhausted(self, func: tirx.PrimFunc) -> bool:
        """Whether a search of ``func`` ended with fewer records than asked: its space holds no more."""
        return workload_key(func) in json.loads(self._meta.read_text()).get("exhausted", {})

    def record_exhausted(self, func: tirx.PrimFunc) -> None:
        self._set("exhausted", workload_key(func), self.records_for(func))

    def _set(self, section: str, key: str, value) -> None:
        meta = json.loads(self._meta.read_text())
        meta.setdefault(section, {})[key] = value
        self._meta.write_text(json.dumps(meta, indent=1))

    def schedule_for(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        sch = self.ms_database.query_schedule(task_module(func), self.spec.tvm_target(), workload_name="main")
        return None if sch is None else sch.mod["main"].with_attr(SCHEDULED_ATTR, True)


def mean_seconds(run_secs) -> float:
    """The mean of one measurement's repeats (MetaSchedule keeps them as FloatImm)."""
    return float(sum(float(t) for t in run_secs) / len(run_secs))


def workload_key(func: tirx.PrimFunc) -> str:
    return str(tvm_ffi.structural_hash(task_module(func)))


def measure_default(scheduled: tirx.PrimFunc, spec: TargetSpec, runner) -> float | None:
    """Seconds of a kernel under the target's default schedule (``scheduled``), built and run like a
    tuning candidate (None if that build or run fails)."""
    mod = task_module(scheduled)
    target = spec.tvm_target()
    (built,) = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S).build([ms.builder.BuilderInput(mod, target)])
    if built.error_msg:
        return None
    try:
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        (future,) = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])
        result = future.result()
    finally:
        Path(built.artifact_path).unlink(missing_ok=True)
    if result.error_msg or not result.run_secs:
        return None
    return mean_seconds(result.run_secs)


def has_symbolic_shapes(func: tirx.PrimFunc) -> bool:
    return any(not isinstance(d, tirx.IntImm) for buf in func.params for d in getattr(buf, "shape", ()))


def extract_kernels(ir_module: tvm.IRModule, spec: TargetSpec) -> list[tuple[str, tirx.PrimFunc]]:
    """(name, unscheduled kernel) per distinct kernel of a lowered module, in name order. Kernels
    with symbolic dims are included; :func:`tune_module` leaves them to the default schedules."""
    target = spec.tvm_target()
    with target:
        mod = tvm.transform.Sequential(family_of(spec).lowering_passes(spec))(ir_module)
    seen, kernels = set(), []
    for gvar, func in sorted(mod.functions_items(), key=lambda item: item[0].name_hint):
        if isinstance(func, tirx.PrimFunc) and gvar.name_hint != "shape_func":
            key = tvm_ffi.structural_hash(task_module(func))
            if key not in seen:
                seen.add(key)
                kernels.append((gvar.name_hint, func))
    return kernels


def tuned_schedules_pass(db: TuningDatabase, report: dict) -> tvm.transform.Pass:
    """Kernels found in ``db`` get their best schedule; ``report`` collects matched/fallback names."""

    @tvm.transform.module_pass(opt_level=0, name="SlimgraphApplyTuningDatabase")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, tirx.PrimFunc) or func.attrs.get(SCHEDULED_ATTR, False):
                continue
            tuned, kind = _tuned_or_default(db, func)
            report.setdefault(kind, []).append(gvar.name_hint)
            if tuned is not None:
                mod[gvar] = tuned
        return mod

    return _pass


def _tuned_or_default(db: TuningDatabase, func: tirx.PrimFunc) -> tuple[tirx.PrimFunc | None, str]:
    """(the kernel to build, the report list it belongs to). The kernel is the tuned one, or the
    default-scheduled one the database made to look up its time (marked scheduled, so the build's
    schedule pass does not schedule it again), or None: no record, the schedule pass makes the default."""
    tuned = db.schedule_for(func)
    if tuned is None:
        return None, "fallback"
    best, default = db.best_seconds(func), db.default_seconds(func)
    if default is not None and best is not None and best < default:
        return tuned, "matched"
    kind = "default_not_measured" if default is None or best is None else "kept_default"
    return db.default_scheduled(func).with_attr(SCHEDULED_ATTR, True), kind


def check_tracker(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a reachable RPC tracker, or TuningError naming the address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TuningError(f"--rpc-tracker wants HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise TuningError(f"RPC tracker {host}:{port} is not reachable ({exc.strerror or exc})",
                          hint="start one with: python -m tvm.exec.rpc_tracker --host HOST --port PORT") from None
    return host, int(port)


def make_runner(rpc_tracker: str | None, rpc_key: str | None, workers: int):
    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S)
    if not rpc_key:
        raise TuningError("--rpc-tracker needs --rpc-key, the device key the servers registered with")
    host, port = check_tracker(rpc_tracker)
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                                 session_timeout_sec=60)
    return ms.runner.RPCRunner(rpc_config=config, max_workers=workers)


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Reports every measured batch of one task: trials so far, the batch's best and the best yet."""

    def __init__(self, name: str, already: int, on_event: EventFn):
        self.name, self.trials, self.best, self.on_event = name, already, None, on_event
        self.start = time.perf_counter()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        times = [mean_seconds(r.run_secs) for r in runner_results if r.error_msg is None and r.run_secs]
        self.trials += len(runner_results)
        current = min(times) if times else None
        if current is not None and (self.best is None or current < self.best):
            self.best = current
        errors = [r.error_msg for r in list(builder_results) + list(runner_results) if r.error_msg]
        self.on_event("tune_progress", {"task": self.name, "trials": self.trials, "current_s": current,
                                        "best_s": self.best, "failed": len(runner_results) - len(times),
                                        "first_error": str(errors[0]).strip().splitlines()[-1][:300] if errors else None,
                                        "elapsed_s": time.perf_counter() - self.start})


def tune_kernel(name: str, func: tirx.PrimFunc, db: TuningDatabase, trials: int, runner, *,
                on_event: EventFn, cost_model: str = "xgb") -> dict:
    """Tune one kernel up to ``trials`` records in ``db``; returns the task's summary row."""
    have = db.records_for(func)
    row = {"task": name, "records_before": have, "trials": trials}
    if db.default_seconds(func) is None:
        seconds = measure_default(db.default_scheduled(func), db.spec, runner)
        if seconds is not None:
            db.record_default(func, seconds)
    row["default_s"] = db.default_seconds(func)
    if have >= trials or db.exhausted(func):
        return {**row, "measured": 0, "best_s": db.best_seconds(func), "skipped": "already tuned"}
    target = db.spec.tvm_target()
    context = ms.TuneContext(mod=task_module(func), target=target, space_generator="post-order-apply",
                             search_strategy="evolutionary", task_name=name, num_threads="physical").clone()
    progress = _Progress(name, have, on_event)
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(), progress]
    ms.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=str(db.folder), max_trials_global=trials - have,
                  num_trials_per_iter=min(64, trials - have), builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S), runner=runner,
                  database=db.ms_database, cost_model=cost_model, measure_callbacks=callbacks)
    if db.records_for(func) < trials:
        db.record_exhausted(func)
    return {**row, "measured": progress.trials - have, "best_s": db.best_seconds(func)}


def _tune_task(index: int, tasks: int, name: str, func: tirx.PrimFunc, db: TuningDatabase, trials: int, runner,
               on_event: EventFn, cost_model: str) -> dict:
    """One task's summary row: tuned, or skipped for its symbolic shapes."""
    if has_symbolic_shapes(func):
        row = {"task": name, "records_before": 0, "trials": trials, "measured": 0, "best_s": None,
               "skipped": "symbolic shape (MetaSchedule tunes static shapes: compile with --shape)"}
    else:
        on_event("tune_task", {"task": name, "index": index, "tasks": tasks, "records": db.records_for(func)})
        row = tune_kernel(name, func, db, trials, runner, on_event=on_event, cost_model=cost_model)
    on_event("tune_task_end", row)
    return row


def tune_module(ir_module: tvm.IRModule, spec: TargetSpec, db_dir: str | Path, trials: int, *,
                rpc_tracker: str | None = None, rpc_key: str | None = None, on_event: EventFn,
                cost_model: str = "xgb") -> dict:
    """Tune every distinct kernel of a lowered module to ``trials`` records in the database."""
    if trials < 1:
        raise TuningError(f"--trials must be at least 1, got {trials}")
    runner = make_runner(rpc_tracker, rpc_key, workers=max(1, spec.num_cores))
    try:
        db = TuningDatabase.open(db_dir, spec, create=True)
        if not db.usable:
            raise TuningError(f"{db.warning}; tune into another --db directory")
        kernels = extract_kernels(ir_module, spec)
        on_event("tune_start", {"tasks": len(kernels), "database": str(db.folder)})
        rows = [_tune_task(index, len(kernels), name, func, db, trials, runner, on_event, cost_model)
                for index, (name, func) in enumerate(kernels)]
    finally:
        runner.pool.shutdown()  # the runner's measuring processes end with the tuning, not with Python
    return {"database": str(db.folder), "target": target_key(spec), "tasks": rows,
            "measured": sum(r["measured"] for r in rows)}
