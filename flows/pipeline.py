"""The DVC pipeline as a Prefect flow: DVC owns what is up to date, Prefect when and where it runs.

Each DVC stage is one Prefect task run that shells out to `dvc repro --single-item <stage>`
(flows.stage), so DVC checks, runs and records the stage (dvc.lock, cache) exactly as a plain
`dvc repro` would, and a flow run never leaves an artifact that `dvc status` calls stale. The DAG
is read from dvc.yaml (flows.graph). A stage is submitted once all its upstream stages have
finished, so independent stages (e.g. training folds) run at once as separate DVC processes; with
`--on-workers` each runs on a Prefect work pool's workers, through a DVC remote (flows.remote).

    segpipe run [--repo .] [--targets train ...] [--max-parallel 2] [--retries 1] [--on-workers]
    segpipe serve [--repo .] [--cron "0 2 * * *"]   # nightly, retrain and predict deployments
    segpipe predict --dataset D --input PATH --out DIR   # = python -m tasks.predict ...
    segpipe export --dataset D --out DIR                 # = python -m tasks.export ...

`segpipe` is `python -m flows.pipeline`. `serve` serves three deployments: `segpipe/nightly` (this
flow, on the cron schedule), `retrain/retrain` (some datasets and archs, on demand) and
`predict/predict` (flows.predict, on demand). `make serve` (flows.server) starts a Prefect server
and the `segpipe` work pool first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import networkx as nx
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import PROJECT_ROOT
from flows.artifacts import publish_evaluation
from flows.graph import UnknownTargetError, read_graph, select, topological_order
from flows.stage import FAILED, NOT_RUN, RAN, RESTORED, UP_TO_DATE, dvc_command, run_stage, stage_env


class PipelineFailed(RuntimeError):
    """Some stages failed. `summary` maps every selected stage to its outcome."""

    def __init__(self, message: str, summary: dict[str, str]):
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):  # keep `summary` if Prefect pickles the exception into a result
        return type(self), (str(self), self.summary)


def threads_per_stage(max_parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // max_parallel)


def visible_gpus() -> list[str]:
    """The GPUs this flow may hand out: those CUDA_VISIBLE_DEVICES names, else every one torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch  # only here: the flow itself needs no torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_of_slot(slot: int, gpus: list[str]) -> str | None:
    """The GPU of the `slot`-th of the stages running at once: its own while there are enough GPUs,
    shared round-robin beyond; None without GPUs (CPU: the stage gets cores / max_parallel threads)."""
    return gpus[slot % len(gpus)] if gpus else None


@task(name="dvc-status", task_run_name="dvc status", cache_policy=NO_CACHE)
def stale_stages(repo: str, stages: list[str] | None) -> dict:
    """`dvc status` of the stages the flow ran: should be empty, as the flow ran them via DVC."""
    out = subprocess.run(
        dvc_command("status", "--json", *(stages or [])),
        cwd=repo,
        env=stage_env(threads=1),
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout or "{}")
    # `always_changed: true` stages are stale by definition; they are not a flow bug.
    return {s: v for s, v in status.items() if v != ["always changed"]}


def run_graph(graph: nx.DiGraph, max_parallel: int, stage_task,
              parameters_of: Callable[[str, int], dict]) -> tuple[dict, dict]:
    """Run every stage of `graph` with `stage_task` once all its upstream stages succeeded;
    `parameters_of(stage, slot)` gives the task's parameters.

    Stages are submitted only when ready (not all at once with `wait_for`): a submitted task
    blocks a pool thread while it waits, which would let waiting stages starve ready ones.
    `wait_for` is still passed so the Prefect UI draws the DAG. Downstream of a failure nothing
    runs; independent branches carry on, as DVC caches whatever they finish.
    """
    order = topological_order(graph)
    rank = {stage: i for i, stage in enumerate(order)}
    summary = dict.fromkeys(order, NOT_RUN)
    errors: dict[str, BaseException] = {}
    missing = {stage: graph.in_degree(stage) for stage in order}
    ready = [stage for stage in order if missing[stage] == 0]
    futures: dict = {}
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()
    # A slot per stage running at once: it decides the stage's GPU (gpu_of_slot), so at most
    # max_parallel stages are submitted at a time and a finished stage hands its slot on.
    free_slots, slot_of = list(range(max_parallel)), {}

    # A runner of our own rather than the flow's: its size is a flow parameter, so that a
    # served deployment can change it per run.
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:

        def submit_ready() -> None:
            while ready and free_slots:
                stage = ready.pop(0)
                slot_of[stage] = free_slots.pop(0)
                upstream = [futures[u] for u in graph.predecessors(stage)]
                future = runner.submit(stage_task, parameters_of(stage, slot_of[stage]), wait_for=upstream)
                futures[stage] = future
                future.add_done_callback(lambda _, s=stage: finished.put(s))

        submit_ready()
        while len(free_slots) < max_parallel:
            stage = finished.get()
            free_slots.append(slot_of[stage])
            free_slots.sort()
            future = futures[stage]
            future.wait()  # records the final state on the future
            if not future.state.is_completed():
                summary[stage] = FAILED
                errors[stage] = future.result(raise_on_failure=False)
            else:
                summary[stage] = future.result()
                for child in graph.successors(stage):
                    missing[child] -= 1
                    if missing[child] == 0:
                        ready.append(child)
                ready.sort(key=rank.get)
            submit_ready()
    return summary, errors


def failure_message(summary: dict[str, str], errors: dict[str, BaseException]) -> str:
    not_run = [s for s, outcome in summary.items() if outcome == NOT_RUN]
    head = f"{len(errors)} of {len(summary)} stages failed: {', '.join(errors)}"
    if not_run:
        head += f"; not run (upstream failed): {', '.join(not_run)}"
    return "\n\n".join([head, *(str(error) for error in errors.values())])


def here_plan(graph: nx.DiGraph, root: str, max_parallel: int):
    """Stages run in `root` on this machine, each with its share of the cores or its own GPU."""
    gpus, threads = visible_gpus(), threads_per_stage(max_parallel)
    return run_stage, lambda stage, slot: {"repo": root, "stage": stage, "threads": threads,
                                           "gpu": gpu_of_slot(slot, gpus)}


def on_workers_plan(graph: nx.DiGraph, root: str, max_parallel: int):
    """Stages run on the work pool's workers, at the commit `root` has checked out; each worker
    uses its own machine's cores and devices."""
    from flows.remote import commit_of, run_stage_on_workers  # it imports this module

    rev = commit_of(Path(root))
    return run_stage_on_workers, lambda stage, slot: {
        "repo": root, "stage": stage, "rev": rev, "upstream": sorted(graph.predecessors(stage)),
        "sources": graph.nodes[stage]["sources"]}


@flow(name="segpipe")
def pipeline(
    repo: str = ".",
    targets: list[str] | None = None,
    max_parallel: int = 2,
    retries: int = 1,
    verify: bool = True,
    on_workers: bool = False,
    retry_delay_s: float = 10.0,
) -> dict[str, str]:
    """Bring the DVC pipeline (or `targets` and their upstream stages) up to date.

    `targets`: stage names (`final`), matrix/foreach groups (`train` = every `train@...`) or
    globs (`train@kvasir-*`). A failed stage is retried `retries` times, after `retry_delay_s`,
    then twice that, and so on. `on_workers`: run each stage on the `segpipe` work pool's workers
    through the DVC remote (flows.remote) rather than here. Returns stage -> "ran" | "restored" |
    "up to date"; on failure raises PipelineFailed (also carrying the summary, with "failed" and
    "not run").
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    logger = get_run_logger()
    root = str(Path(repo).resolve())
    graph = select(read_graph(root), targets)
    logger.info("%d stages, up to %d at once: %s", len(graph), max_parallel,
                ", ".join(topological_order(graph)))
    stage_task, parameters_of = (on_workers_plan if on_workers else here_plan)(graph, root, max_parallel)
    stage_task = stage_task.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay_s))
    summary, errors = run_graph(graph, max_parallel, stage_task, parameters_of)
    publish_evaluation(root, summary)  # a markdown and a table artifact per dataset evaluated

    changed = [s for s, outcome in summary.items() if outcome in (RAN, RESTORED)]
    logger.info("changed: %s; up to date: %d stages",
                ", ".join(f"{s} ({summary[s]})" for s in changed) or "none",
                sum(outcome == UP_TO_DATE for outcome in summary.values()))
    if errors:
        raise PipelineFailed(failure_message(summary, errors), summary)
    if verify:
        stale = stale_stages(root, list(summary) if targets else None)
        if stale:
            logger.warning("dvc status still reports stale stages after the run "
                           "(was the workspace edited meanwhile?): %s", json.dumps(stale))
    return summary


def retrain_targets(datasets: list[str], archs: list[str] | None) -> list[str]:
    """Each dataset's evaluation (its every member, ensemble and report) or, with `archs`, only the
    folds of those archs: trained and predicted, ready for the next ensemble."""
    if not archs:
        return [f"evaluate@{dataset}" for dataset in datasets]
    return [f"infer@{dataset}-{arch}-*" for dataset in datasets for arch in archs]


@flow(name="retrain")
def retrain(
    datasets: list[str],
    archs: list[str] | None = None,
    repo: str = ".",
    max_parallel: int = 2,
    retries: int = 1,
    on_workers: bool = False,
) -> dict[str, str]:
    """Bring some datasets (and archs) up to date after their data or params changed, without
    waiting for the nightly run: the pipeline flow on retrain_targets. DVC reruns what changed."""
    return pipeline(repo=repo, targets=retrain_targets(datasets, archs), max_parallel=max_parallel,
                    retries=retries, on_workers=on_workers)


# `segpipe predict ...` and `segpipe export ...` hand their arguments, unchanged, to these stage
# modules: their own parsers give the help, the errors and the exit codes.
FORWARDED = {
    "predict": "segment new images with a trained ensemble (tasks.predict)",
    "export": "export a trained ensemble to run without segpipe (tasks.export)",
}


def deployment(name: str, cron: str, parameters: dict):
    """The scheduled deployment that `serve` runs. The server holds it to one run at a time (two
    would race on the same repo) without holding up the predict deployment served beside it."""
    return pipeline.to_deployment(name=name, cron=cron, parameters=parameters, concurrency_limit=1)


def retrain_deployment(parameters: dict):
    """On demand, one run at a time on the repo, like the nightly one; `datasets` given per run."""
    defaults = {key: parameters[key] for key in ("repo", "max_parallel", "retries", "on_workers")}
    return retrain.to_deployment(name="retrain", parameters=defaults, concurrency_limit=1)


def serve(name: str, cron: str, parameters: dict) -> int:
    """Serve the nightly pipeline and, on the same repo, the unscheduled retrain and predict
    deployments."""
    import prefect
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("note: schedules need a running server: `prefect server start`, then set "
              "PREFECT_API_URL", file=sys.stderr)
    # Served runs import the flow files by path and `flows.*` from the working directory.
    os.chdir(PROJECT_ROOT)
    from flows.predict import deployment as predict_deployment  # here: it imports this module

    prefect.serve(deployment(name, cron, parameters), retrain_deployment(parameters),
                  predict_deployment(parameters["repo"]))
    return 0


def forward(command: str, argv: list[str]) -> int:
    """Run `tasks.<command>` on `argv` as `python -m tasks.<command> ...` does; imported only
    now, as the stages pull in torch."""
    from tasks.common import run

    module = importlib.import_module(f"tasks.{command}")
    parser = module.build_parser()
    parser.prog = f"segpipe {command}"
    sys.argv = [parser.prog, *argv]  # what `run` parses, as in the module's own __main__
    run(module.main, parser)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="segpipe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline once")
    serve = commands.add_parser("serve", help="serve the nightly pipeline, retrain and predict")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default: nightly, 02:00)")
    serve.add_argument("--name", default="nightly", help="the pipeline deployment's name")
    for sub in (run, serve):
        sub.add_argument("--repo", default=".", help="DVC repo root (default: .)")
        sub.add_argument("--targets", nargs="+", metavar="STAGE",
                         help="stages, groups (train) or globs; upstream stages come along")
        sub.add_argument("--max-parallel", type=int, default=2, help="stages at once (default 2)")
        sub.add_argument("--retries", type=int, default=1, help="retries per stage (default 1)")
        sub.add_argument("--retry-delay", type=float, default=10.0, metavar="S",
                         help="seconds before a stage's first retry, doubled for each next one (default 10)")
        sub.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip the `dvc status` check after the run")
        sub.add_argument("--on-workers", action="store_true",
                         help="run stages on the `segpipe` work pool's workers, through the DVC remote")
    for name, summary in FORWARDED.items():  # listed for --help; main dispatches them unparsed
        commands.add_parser(name, help=f"{summary}; see `segpipe {name} --help`", add_help=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in FORWARDED:  # before argparse, which would claim --help and options
        return forward(argv[0], argv[1:])
    args = parse_args(argv)
    parameters = {"repo": str(Path(args.repo).resolve()), "targets": args.targets,
                  "max_parallel": args.max_parallel, "retries": args.retries,
                  "verify": args.verify, "on_workers": args.on_workers, "retry_delay_s": args.retry_delay}
    if args.command == "serve":
        return serve(args.name, args.cron, parameters)
    try:
        summary = pipeline(**parameters)
    except PipelineFailed as exc:
        print(json.dumps(exc.summary, indent=2))
        print(exc, file=sys.stderr)
        return 1
    except UnknownTargetError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
