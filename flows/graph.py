"""The pipeline DAG, read from dvc.yaml through DVC's own index.

dvc.yaml is the single source of truth for stages and their dependencies. This module only
translates DVC's stage graph into stage addresses (the names `dvc repro` accepts, e.g.
`train@kvasir-unet-0`), so the flow never declares an edge of its own.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

import networkx as nx


class UnknownTargetError(ValueError):
    """A target names no stage of the pipeline."""


def read_graph(root: str | os.PathLike[str]) -> nx.DiGraph:
    """Stages of the DVC repo at `root`, with an edge upstream -> downstream.

    Only stages with a command are nodes: `.dvc` data sources have nothing to run and no
    upstream stages, so dropping them loses no edge between runnable stages. Each node's
    `sources` lists the `.dvc` files whose data the stage reads (what a worker must pull).
    """
    # Imported here so that importing the flow module stays cheap (dvc pulls in a lot).
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    graph = nx.DiGraph()
    with Repo(os.fspath(root)) as repo:
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage) and s.cmd]
        address = {s: stage_address(s, repo.root_dir) for s in stages}
        for node in address.values():
            graph.add_node(node, sources=[])
        # DVC's graph points from a stage to the stages whose outputs it reads.
        for stage, upstream in repo.index.graph.edges:
            if stage in address and upstream in address:
                graph.add_edge(address[upstream], address[stage])
            elif stage in address and not isinstance(upstream, PipelineStage):  # a `.dvc` file
                dvcfile = Path(os.path.relpath(upstream.path, repo.root_dir)).as_posix()
                graph.nodes[address[stage]]["sources"].append(dvcfile)
    return graph


def stage_outputs(root: str | os.PathLike[str], stages: Iterable[str], cached: bool) -> dict[str, list[str]]:
    """The outputs of `stages`, by stage, as paths relative to `root`: those in DVC's cache, or
    (cached=False) those it keeps out of its cache and so out of any remote (`cache: false`:
    plans, metrics, plots)."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    wanted = set(stages)
    with Repo(os.fspath(root)) as repo:
        found = {stage_address(s, repo.root_dir): s for s in repo.index.stages if isinstance(s, PipelineStage)}
        return {address: [Path(os.path.relpath(out.fs_path, repo.root_dir)).as_posix()
                          for out in found[address].outs if out.use_cache == cached]
                for address in wanted & found.keys()}


def stage_address(stage, root: str) -> str:
    """How `dvc repro`, run in `root`, names `stage`.

    DVC's own `stage.addressing` is relative to the current directory, which the flow does not
    control, so it is rebuilt relative to the repo root.
    """
    dvcfile = Path(os.path.relpath(stage.path, root)).as_posix()
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def matches(stage: str, target: str) -> bool:
    """A target names a stage exactly, all items of a matrix/foreach group, or is a glob."""
    return stage == target or stage.startswith(f"{target}@") or fnmatch.fnmatchcase(stage, target)


def select(graph: nx.DiGraph, targets: Iterable[str] | None = None) -> nx.DiGraph:
    """The subgraph the targets need: the stages they name and every stage upstream of them.

    No targets means the whole pipeline. A target that names no stage is an error rather than
    a silent no-op, so a typo in a nightly schedule fails loudly.
    """
    targets = list(targets or [])
    if not targets:
        return graph.copy()
    chosen: set[str] = set()
    for target in targets:
        hits = {stage for stage in graph if matches(stage, target)}
        if not hits:
            known = ", ".join(topological_order(graph))
            raise UnknownTargetError(f"target {target!r} names no stage; stages: {known}")
        chosen |= hits
    for stage in list(chosen):
        chosen |= nx.ancestors(graph, stage)
    return graph.subgraph(chosen).copy()


def topological_order(graph: nx.DiGraph) -> list[str]:
    """Upstream first; ties broken by name so that runs and logs are reproducible."""
    return list(nx.lexicographical_topological_sort(graph))
