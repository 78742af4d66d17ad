"""Stages on workers that share no disk with the coordinator: a Prefect work pool and a DVC remote.

With `segpipe run --on-workers`, the coordinator (the `segpipe` flow, in its own clone of the repo)
runs no stage itself. It starts one `dvc-stage/stage` flow run per stage on the `segpipe` work pool,
and any `prefect worker start --pool segpipe` picks it up, on any machine, in that worker's own
clone (its path in SEGPIPE_CLONE, which the deployment's pull step changes into: prefect.yaml).
There the flow run:

1. puts the clone at the coordinator's commit, and writes the coordinator's dvc.lock entries of the
   stage and of its upstream stages into the clone's dvc.lock;
2. pulls the upstream stages' outputs (and the `.dvc` sources the stage reads) from the DVC remote;
   outputs DVC keeps out of its cache (`cache: false`: plans, metrics, plots), which no remote
   holds, come with the flow run's parameters instead;
3. runs `dvc repro --single-item <stage>` there;
4. pushes the stage's outputs to the remote, and reports the stage's new dvc.lock entry and its
   uncached outputs back as a Prefect artifact of its flow run.

The coordinator writes that entry into its own dvc.lock, writes the uncached outputs and pulls the
others, so that it ends with the dvc.lock and the clean `dvc status` a plain `dvc repro` gives. A stage already up to date in the
coordinator is not sent anywhere; its outputs are pushed, so that workers can pull them.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.deployments import run_deployment

from flows.artifacts import artifact_key
from flows.graph import stage_outputs
from flows.stage import UP_TO_DATE, StageFailed, dvc_command, run_stage, stage_env

STAGE_DEPLOYMENT = "dvc-stage/stage"
LOCK = "dvc.lock"
REPORT_FENCE = "```json"

# The coordinator's dvc.lock is read and rewritten by several stage tasks at once: one at a time.
coordinator_lock = threading.Lock()


class WorkerCloneError(RuntimeError):
    """A worker's clone cannot run the coordinator's commit."""


def run(cmd: list[str], cwd: Path, what: str) -> str:
    """`cmd`'s output; a failure raises StageFailed naming `what` and quoting the command's output."""
    out = subprocess.run(cmd, cwd=cwd, env=stage_env(threads=1), capture_output=True, text=True)
    if out.returncode != 0:
        raise StageFailed(f"{what}: `{' '.join(cmd[1:])}` in {cwd} exited with {out.returncode}:\n"
                          + (out.stdout + out.stderr).strip()[-3000:])
    return out.stdout


def git(clone: Path, *args: str) -> str:
    return run(["git", *args], clone, f"git in {clone}").strip()


def dvc(clone: Path, *args: str, what: str) -> str:
    return run(dvc_command(*args), clone, what)


def local_changes(clone: Path) -> list[str]:
    """Tracked files changed and not committed, but dvc.lock: the stages rewrite it as they run."""
    status = git(clone, "status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines()]
    return [path for path in changed if path != LOCK]


def commit_of(repo: Path) -> str:
    """The commit workers must run: the coordinator's HEAD, with no change left uncommitted, since
    a worker sees only what git and the DVC remote give it."""
    changed = local_changes(repo)
    if changed:
        raise WorkerCloneError(f"{repo}: uncommitted changes to {', '.join(changed)}; workers run "
                               "commits only: commit them (and push where the workers' clones pull)")
    return git(repo, "rev-parse", "HEAD")


def read_lock(repo: Path) -> dict:
    path = repo / LOCK
    lock = yaml.safe_load(path.read_text()) if path.exists() else None
    return lock or {"schema": "2.0", "stages": {}}


def lock_entries(repo: Path, stages: list[str]) -> dict[str, dict]:
    """The dvc.lock entries (the documented dvc.lock format: deps, params, outs with their hashes)
    of those of `stages` that have one."""
    recorded = read_lock(repo)["stages"]
    return {stage: recorded[stage] for stage in stages if stage in recorded}


def write_lock_entries(repo: Path, entries: dict[str, dict]) -> None:
    lock = read_lock(repo)
    lock["stages"].update(entries)
    (repo / LOCK).write_text(yaml.safe_dump(lock, sort_keys=False))


def pack(repo: Path, outputs: list[str]) -> dict[str, dict[str, str]]:
    """The files of each of `outputs` (paths relative to `repo`), base64 by path."""
    packed = {}
    for output in outputs:
        path = repo / output
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        packed[output] = {f.relative_to(repo).as_posix(): base64.b64encode(f.read_bytes()).decode()
                          for f in files}
    return packed


def unpack(repo: Path, packed: dict[str, dict[str, str]]) -> None:
    """Write each output as packed, in place of what was there: a stage's outputs are replaced
    whole, as `dvc repro` replaces them."""
    for output, files in packed.items():
        path = repo / output
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
        for name, data in files.items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes(base64.b64decode(data))


def uncached_of(repo: Path, stages: list[str]) -> dict[str, dict[str, str]]:
    return pack(repo, [out for outs in stage_outputs(repo, stages, cached=False).values() for out in outs])


def ignore_in_git(repo: Path, stage: str) -> None:
    """List the stage's cached outputs in the .gitignore beside each, as `dvc repro` does when it
    runs a stage (`dvc pull` does not), so that git never offers to commit pulled data."""
    for output in stage_outputs(repo, [stage], cached=True).get(stage, []):
        path = repo / output
        ignore, line = path.parent / ".gitignore", f"/{path.name}"
        lines = ignore.read_text().splitlines() if ignore.exists() else []
        if line not in lines:
            ignore.write_text("".join(f"{entry}\n" for entry in [*lines, line]))


def follow(clone: Path, rev: str) -> None:
    """Put the worker's clone at the coordinator's commit: fetched from `origin` when missing."""
    changed = local_changes(clone)
    if changed:
        raise WorkerCloneError(f"{clone}: this worker's clone has uncommitted changes to "
                               f"{', '.join(changed)}; a worker's clone must be clean")
    if git(clone, "rev-parse", "HEAD") == rev:
        return
    if git(clone, "ls-files", LOCK):  # tracked: the committed one, before switching commits
        git(clone, "checkout", "--quiet", "HEAD", "--", LOCK)
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=clone).returncode != 0:
        git(clone, "fetch", "--quiet", "origin")
    try:
        git(clone, "checkout", "--quiet", "--detach", rev)
    except StageFailed as exc:
        raise WorkerCloneError(f"{clone}: cannot check out the coordinator's commit {rev} "
                               "(pushed where this clone's `origin` points?)") from exc


def report(stage: str, outcome: str, entry: dict, outputs: dict, clone: Path) -> str:
    """The artifact a worker leaves: readable in the UI, and, as JSON, the outcome, dvc.lock entry
    and uncached outputs for the coordinator (Prefect keeps artifacts on the server, which both
    reach; a flow's return value would need result storage shared between the machines)."""
    record = {"outcome": outcome, "entry": entry, "outputs": outputs, "clone": str(clone),
              "host": socket.gethostname()}
    return (f"### `{stage}`: {outcome}\nin `{clone}` on `{record['host']}`\n\n"
            f"{REPORT_FENCE}\n{json.dumps(record, indent=1)}\n```\n")


def record_of(markdown: str) -> dict:
    start = markdown.index(REPORT_FENCE) + len(REPORT_FENCE)
    return json.loads(markdown[start:markdown.index("```", start)])


@flow(name="dvc-stage", flow_run_name="{stage}")
def remote_stage(stage: str, rev: str, entries: dict[str, dict], pull: list[str],
                 uncached: dict[str, dict[str, str]]) -> str:
    """Run one stage in this worker's clone (the working directory) at commit `rev`, given the
    coordinator's dvc.lock `entries` of the stage and its upstream stages; `pull`: the upstream
    stages and `.dvc` files whose outputs the stage reads; `uncached`: the upstream stages'
    uncached outputs (see pack). Returns the stage's outcome."""
    clone = Path.cwd()
    follow(clone, rev)
    write_lock_entries(clone, entries)
    unpack(clone, uncached)
    if pull:
        dvc(clone, "pull", *pull, what=f"stage {stage!r}: pulling its inputs")
    outcome = run_stage(str(clone), stage, threads=None)  # the worker machine's own cores
    dvc(clone, "push", stage, what=f"stage {stage!r}: pushing its outputs")
    entry = lock_entries(clone, [stage])[stage]
    outputs = uncached_of(clone, [stage])
    create_markdown_artifact(markdown=report(stage, outcome, entry, outputs, clone),
                             key=artifact_key("dvc-lock", stage), description=f"dvc.lock entry of {stage}")
    return outcome


def reported(flow_run_id) -> dict:
    """What the worker's flow run reported: outcome, dvc.lock entry, clone and host."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return record_of(found[0].data)


def up_to_date(repo: Path, stage: str) -> bool:
    status = dvc(repo, "status", "--json", stage, what=f"stage {stage!r}: dvc status")
    return json.loads(status or "{}") == {}


@task(name="dvc-stage-on-workers", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage_on_workers(repo: str, stage: str, rev: str, upstream: list[str], sources: list[str]) -> str:
    """Run `stage` as a `dvc-stage/stage` flow run on the work pool and bring its dvc.lock entry
    and outputs into the coordinator's repo `repo`. Returns the outcome the worker saw."""
    root = Path(repo)
    with coordinator_lock:
        if up_to_date(root, stage):  # nothing to send; workers pull its outputs from the remote
            dvc(root, "push", stage, what=f"stage {stage!r}: pushing its outputs")
            return UP_TO_DATE
        entries = lock_entries(root, [stage, *upstream])
        uncached = uncached_of(root, upstream)
    parameters = {"stage": stage, "rev": rev, "entries": entries, "pull": [*upstream, *sources],
                  "uncached": uncached}
    flow_run = run_deployment(STAGE_DEPLOYMENT, parameters=parameters, timeout=None, poll_interval=2)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageFailed(f"stage {stage!r} failed on a worker (flow run {flow_run.name}, "
                          f"{state.name if state else 'no state'}): {state.message if state else ''}")
    record = reported(flow_run.id)
    with coordinator_lock:
        write_lock_entries(root, {stage: record["entry"]})
        unpack(root, record["outputs"])
        dvc(root, "pull", stage, what=f"stage {stage!r}: pulling its outputs")
        ignore_in_git(root, stage)
    get_run_logger().info("stage %s: %s in %s on %s", stage, record["outcome"], record["clone"],
                          record["host"])
    return record["outcome"]
