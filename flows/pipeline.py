"""The DVC pipeline as a Prefect flow: DVC owns what is up to date, Prefect when and where it runs.

Each DVC stage is one Prefect task run that shells out to `dvc repro --single-item <stage>`, so
DVC checks, runs and records the stage (dvc.lock, cache) exactly as a plain `dvc repro` would,
and a flow run never leaves an artifact that `dvc status` calls stale. The DAG is read from
dvc.yaml (flows.graph). A stage is submitted once all its upstream stages have finished, so
independent stages (e.g. training folds) run at once as separate DVC processes.

    segpipe run [--repo .] [--targets train ...] [--max-parallel 2] [--retries 1]
    segpipe serve [--repo .] [--cron "0 2 * * *"]   # nightly retrain, and predict on demand
    segpipe predict --dataset D --input PATH --out DIR   # = python -m tasks.predict ...
    segpipe export --dataset D --out DIR                 # = python -m tasks.export ...

`segpipe` is `python -m flows.pipeline`. `serve` serves two deployments: `segpipe/nightly` (this
flow, on the cron schedule) and `predict/predict` (flows.predict, run on demand).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Offline, quiet defaults. Set before prefect is imported because prefect reads its settings
# once, at import; setdefault so that an environment (tests, a real server) can override them.
for _key, _value in {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The temporary local server takes 4-11 s to start, more on a loaded machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable  # noqa: E402

import networkx as nx  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.artifacts import publish_evaluation  # noqa: E402
from flows.graph import UnknownTargetError, read_graph, select, topological_order  # noqa: E402

RAN, RESTORED, UP_TO_DATE, FAILED, NOT_RUN = "ran", "restored", "up to date", "failed", "not run"
TAIL_LINES = 40  # of DVC's output, quoted in the error of a failed stage


class StageFailed(RuntimeError):
    """One stage's `dvc repro` failed; the message names the stage and quotes DVC's output."""


class PipelineFailed(RuntimeError):
    """Some stages failed. `summary` maps every selected stage to its outcome."""

    def __init__(self, message: str, summary: dict[str, str]):
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):  # keep `summary` if Prefect pickles the exception into a result
        return type(self), (str(self), self.summary)


def dvc_command(*args: str) -> list[str]:
    # `-m dvc` pins the dvc of this interpreter. --wait-for-lock: concurrent `dvc repro -s`
    # processes take turns on the repo lock to hash and commit outputs; without it a process
    # gives up after 3 s and loses a finished stage (seen with 6 stages of 6,000-file outputs).
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def stage_env(threads: int, gpu: str | None = None) -> dict[str, str]:
    # Stage commands say `python -m tasks...`: put this interpreter first on PATH so they run
    # in the flow's environment even when it was started as `.venv/bin/python` unactivated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Stages running at once share the cores: torch spinning more threads than cores makes two
    # concurrent trainings several times slower than one after the other.
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if gpu is not None:  # the stage sees its one GPU as cuda:0
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # Unbuffered, so that a command's prints reach the log as they happen, in order with its errors.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


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


# What `dvc repro` prints for each outcome (DVC 3.x wording), in order of precedence.
MARKERS = {
    RAN: "Running stage '{}'",
    RESTORED: "Stage '{}' is cached",  # run cache: same cmd, deps, params ran before
    UP_TO_DATE: "'{}' didn't change, skipping",
}


def outcome_of(seen: set[str]) -> str:
    """The outcome, given those of MARKERS the output contained. Output that matches none
    counts as ran: wrongly claiming "up to date" would hide a change."""
    return next((outcome for outcome in MARKERS if outcome in seen), RAN)


def run_logged(cmd: list[str], cwd: str, env: dict[str, str],
               watch: Callable[[str], None] = lambda line: None) -> tuple[int, list[str]]:
    """Run `cmd` in `cwd`, logging its output (stderr merged in) line by line as it comes, so
    that a long run logs as it goes; `watch` sees each line too. Returns the exit code and the
    last TAIL_LINES lines, for the error of a failed run."""
    logger = get_run_logger()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue  # DVC spaces its hints with blank lines; in a log they are noise
        logger.info("%s", line)
        tail.append(line)
        watch(line)
    return proc.wait(), list(tail)


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(repo: str, stage: str, threads: int, gpu: str | None = None) -> str:
    """Run one stage through DVC; return RAN, RESTORED or UP_TO_DATE. No Prefect caching:
    DVC decides whether the stage is up to date."""
    seen: set[str] = set()
    code, tail = run_logged(
        dvc_command("repro", "--single-item", stage), repo, stage_env(threads, gpu),
        watch=lambda line: seen.update(o for o, m in MARKERS.items() if m.format(stage) in line),
    )
    if code != 0:
        raise StageFailed(
            f"stage {stage!r} failed: `dvc repro --single-item {stage}` exited with "
            f"{code}; its last lines:\n" + "\n".join(tail)
        )
    outcome = outcome_of(seen)
    get_run_logger().info("stage %s: %s", stage, outcome)
    return outcome


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


def run_graph(graph: nx.DiGraph, repo: str, max_parallel: int, retries: int) -> tuple[dict, dict]:
    """Run every stage of `graph` once all its upstream stages succeeded.

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
    stage_task = run_stage.with_options(retries=retries)
    # A slot per stage running at once: it decides the stage's GPU (gpu_of_slot), so at most
    # max_parallel stages are submitted at a time and a finished stage hands its slot on.
    gpus, free_slots, slot_of = visible_gpus(), list(range(max_parallel)), {}

    # A runner of our own rather than the flow's: its size is a flow parameter, so that a
    # served deployment can change it per run.
    with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:

        def submit_ready() -> None:
            while ready and free_slots:
                stage = ready.pop(0)
                slot_of[stage] = free_slots.pop(0)
                upstream = [futures[u] for u in graph.predecessors(stage)]
                parameters = {"repo": repo, "stage": stage, "threads": threads_per_stage(max_parallel),
                              "gpu": gpu_of_slot(slot_of[stage], gpus)}
                future = runner.submit(stage_task, parameters, wait_for=upstream)
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


@flow(name="segpipe")
def pipeline(
    repo: str = ".",
    targets: list[str] | None = None,
    max_parallel: int = 2,
    retries: int = 1,
    verify: bool = True,
) -> dict[str, str]:
    """Bring the DVC pipeline (or `targets` and their upstream stages) up to date.

    `targets`: stage names (`final`), matrix/foreach groups (`train` = every `train@...`) or
    globs (`train@kvasir-*`). Returns stage -> "ran" | "restored" | "up to date"; on failure
    raises PipelineFailed (also carrying the summary, with "failed" and "not run").
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    logger = get_run_logger()
    root = str(Path(repo).resolve())
    graph = select(read_graph(root), targets)
    logger.info("%d stages, up to %d at once: %s", len(graph), max_parallel,
                ", ".join(topological_order(graph)))
    summary, errors = run_graph(graph, root, max_parallel, retries)
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


def serve(name: str, cron: str, parameters: dict) -> int:
    """Serve the nightly pipeline and, on the same repo, the unscheduled predict deployment."""
    import prefect
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("note: schedules need a running server: `prefect server start`, then set "
              "PREFECT_API_URL", file=sys.stderr)
    # Served runs import the flow files by path and `flows.*` from the working directory.
    os.chdir(PROJECT_ROOT)
    from flows.predict import deployment as predict_deployment  # here: it imports this module

    prefect.serve(deployment(name, cron, parameters), predict_deployment(parameters["repo"]))
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
    serve = commands.add_parser("serve", help="serve the nightly pipeline and on-demand predict")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default: nightly, 02:00)")
    serve.add_argument("--name", default="nightly", help="the pipeline deployment's name")
    for sub in (run, serve):
        sub.add_argument("--repo", default=".", help="DVC repo root (default: .)")
        sub.add_argument("--targets", nargs="+", metavar="STAGE",
                         help="stages, groups (train) or globs; upstream stages come along")
        sub.add_argument("--max-parallel", type=int, default=2, help="stages at once (default 2)")
        sub.add_argument("--retries", type=int, default=1, help="retries per stage (default 1)")
        sub.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip the `dvc status` check after the run")
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
                  "verify": args.verify}
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
