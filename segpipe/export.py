"""Export: a dataset's trained ensemble as a MONAI bundle that runs without segpipe installed.

    cd DIR && python -m monai.bundle run --config_file configs/inference.json \\
        --meta_file configs/metadata.json --input_dir IN --output_dir OUT

DIR/
    configs/metadata.json    MONAI bundle metadata: versions, each network's inputs and outputs, the
                             classes, and under "segpipe" the members, weights, thresholds, settings
    configs/inference.json   builds scripts.bundle_runtime.Ensemble and runs it on input_dir
    configs/logging.conf     log each file predicted to stdout
    models/<arch>_fold<k>.ts    each member as TorchScript: what the bundle runs
    models/<arch>_fold<k>.onnx  each member as ONNX where its network exports (logits, see below)
    scripts/                 segpipe's own inference code (PORTABLE), copied verbatim
    docs/README.md           how to run it, what it reads and writes

Why the bundle gives the pipeline's answer: probabilities are rounded to 1/1024, so a bundle that
computed the same thing with other float operations, or in another order, would move some of them
by a step. It runs the very modules segpipe's infer and ensemble stages run (they import nothing of
segpipe but each other), with the settings the stages used (the plan's test-time flips, the ingest
chunk that sets the rows inference reads at a time and its bands), on TorchScript modules that the
export checks give the checkpoint's logits bit for bit on CPU.

ONNX files are for other runtimes (onnxruntime, TensorRT): the same network's logits, close but not
bit for bit, so they are not what the bundle runs. A network that does not export to ONNX is left
without its file, with the reason logged and recorded in metadata.json.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from torch import nn

from segpipe.atomic import Owner, atomic_dir
from segpipe.config import InferConfig
from segpipe.errors import ConfigError
from segpipe.infer import meta_tile_extent
from segpipe.train import load_model

log = logging.getLogger(__name__)

# segpipe's inference code that a bundle runs, copied into its scripts/ package: each imports nothing
# of segpipe but these, relatively (tests/test_export.py checks that).
PORTABLE = ("preprocess", "tiling", "infer_core", "ensemble_core", "bundle_runtime")
SOURCE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
AXES = {-1: "left-right", -2: "up-down"}  # flipped dims, in words
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the ONNX exporter colours its messages


@dataclass(frozen=True)
class Kind:
    """What a dataset's inputs are, for the bundle's reader and its metadata."""

    reader: str  # segpipe.bundle_runtime.READERS
    data_type: str
    modality: str
    task: str


KINDS = {
    "kvasir": Kind("rgb", "jpeg", "colonoscopy (RGB)", "polyp segmentation in colonoscopy images"),
    "usc_timit": Kind("video", "video", "real-time MRI of the vocal tract", "vocal-tract airway segmentation per frame"),
    "hand_xray": Kind("grey", "png", "X-ray", "multi-label hand-bone segmentation (sliding window, full resolution)"),
}


def example_input(meta: dict[str, Any], batch: int) -> torch.Tensor:
    """A z-scored-like batch at the model's input size, the same on every export."""
    size = tuple(meta["image_size"])
    return torch.randn((batch, meta["in_channels"]) + size, generator=torch.Generator().manual_seed(0))


def same_logits(model: nn.Module, exported: nn.Module, inputs: list[torch.Tensor], repeats: int = 3) -> bool:
    """Whether `exported` gives `model`'s logits bit for bit, over several calls (TorchScript
    optimises its graph after the first ones)."""
    with torch.inference_mode():
        return all(torch.equal(model(x), exported(x)) for x in inputs for _ in range(repeats))


def to_torchscript(model: nn.Module, inputs: list[torch.Tensor]) -> tuple[torch.jit.ScriptModule, bool]:
    """The network as TorchScript, and whether it reproduces the eager logits bit for bit: scripted
    (shape-generic), else traced at `inputs[0]`'s shape (what a network that does not script takes)."""
    try:
        scripted = torch.jit.script(model)
    except Exception as exc:  # TorchScript raises several types for code it cannot compile
        log.info("%s does not script (%s): tracing it", type(model).__name__, exc)
    else:
        if same_logits(model, scripted, inputs):
            return scripted, True
        log.info("%s scripted gives other logits than eager: tracing it", type(model).__name__)
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs[0], check_trace=False)
    return traced, same_logits(model, traced, inputs)


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps what failed in its own errors."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {ANSI.sub('', str(exc)).strip().partition(chr(10))[0]}"


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[bool, str | None]:
    """Write the network as ONNX (logits) to `path`, taking any batch size where it exports so, else
    `example`'s (SwinUNETR checks its input's shape in numpy, which a symbolic batch defeats).
    Returns (any batch size, None), or (False, why it does not export)."""
    reasons = []
    for dynamic in (True, False):
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=shapes, external_data=False, dynamo=True, verbose=False)
        except Exception as exc:  # the exporter raises many types, and needs onnx and onnxscript installed
            reasons.append(f"{'any' if dynamic else 'fixed'} batch: {root_cause(exc)}")
        else:
            return dynamic, None
    path.unlink(missing_ok=True)
    return False, "; ".join(reasons)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def network_format(meta: dict[str, Any], extent: tuple[int, int] | None, modality: str) -> dict[str, Any]:
    """MONAI's network_data_format of one member: what its TorchScript takes and gives."""
    shape, tiled = list(meta["image_size"]), extent is not None
    channels = {"0": "grey"} if meta["in_channels"] == 1 else {"0": "R", "1": "G", "2": "B"}
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude", "modality": modality, "num_channels": meta["in_channels"],
            "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": tiled,
            "channel_def": channels,
        }},
        "outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": len(meta["classes"]),
            "spatial_shape": shape, "dtype": "float32", "value_range": [], "is_patch_data": tiled,
            "channel_def": {str(i): name for i, name in enumerate(meta["classes"])},
        }},
    }


def metadata(dataset: str, members: list[dict[str, Any]], classes: list[str], recorded: dict[str, Any],
             infer: dict[str, Any]) -> dict[str, Any]:
    kind, first = KINDS[dataset], members[0]
    flips = ", ".join(" + ".join(AXES[d] for d in dims) for dims in infer["flips"]) or "none"
    how = (f"tiles of {first['tile_extent'][0]}x{first['tile_extent'][1]} px resized to "
           f"{first['meta']['image_size'][0]}x{first['meta']['image_size'][1]}, blended" if first["tile_extent"]
           else f"each image (frame) resized to {first['meta']['image_size'][0]}x{first['meta']['image_size'][1]}")
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by segpipe from the trained {dataset} ensemble"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pillow": package_version("pillow"), "av": package_version("av")},
        "optional_packages_version": {"onnxruntime": package_version("onnxruntime")},
        "name": f"segpipe {dataset} ensemble",
        "task": kind.task,
        "description": (
            f"segpipe's trained {dataset} ensemble: {len(members)} members ({recorded['weighting']} weighting), "
            f"per-image z-score, {how}, test-time flips ({flips}) averaged in logits, per-class "
            "sigmoid rounded to 1/1024 in float16, the weighted mean cut by per-class thresholds."),
        "authors": "segpipe",
        "copyright": "see the training data's licence",
        "data_source": f"the {dataset} data the pipeline was trained on",
        "data_type": kind.data_type,
        "image_classes": f"{kind.modality}, one file per case ({kind.reader})",
        "label_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(classes)),
        "pred_classes": ", ".join(f"{i}: {name}" for i, name in enumerate(classes)),
        "eval_metrics": {f"val_dice_{name}": choice.get("val_dice")
                         for name, choice in recorded["thresholds"].items()},
        "intended_use": "research; outputs are to be checked by a person",
        "references": [],
        "network_data_format": network_format(first["meta"], first["tile_extent"], kind.modality),
        "segpipe": {
            "dataset": dataset, "classes": classes, "weighting": recorded["weighting"],
            "thresholds": recorded["thresholds"], "inference": infer,
            "members": [{k: v for k, v in m.items() if k != "meta"}
                        | {k: m["meta"].get(k) for k in ("arch", "fold", "val_dice", "epoch")} for m in members],
        },
    }


def inference_config(dataset: str, members: list[dict[str, Any]], classes: list[str], thresholds: list[float],
                     infer: dict[str, Any], chunk: int) -> dict[str, Any]:
    """configs/inference.json: MONAI's config syntax (`_target_`, `@ref`, `$expression`)."""
    return {
        "imports": ["$import scripts"],
        "bundle_root": ".",
        "input_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/output'",
        "device": "cpu",
        "threads": 1,
        "ensemble": {
            "_target_": "scripts.bundle_runtime.Ensemble",
            "bundle_root": "@bundle_root",
            "members": [{k: m[k] for k in ("name", "torchscript", "weight", "tile_extent", "meta")} for m in members],
            "classes": classes,
            "thresholds": thresholds,
            "inference": infer,
            "reader": KINDS[dataset].reader,
            "chunk": chunk,
            "device": "@device",
            "threads": "@threads",
        },
        "run": ["$@ensemble.run(@input_dir, @output_dir)"],
    }


# Python's logging config, as MONAI model-zoo bundles ship it: the bundle logs each file it predicts.
LOGGING = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s %(name)s %(levelname)s %(message)s
"""

README = """# segpipe {dataset} ensemble (MONAI bundle)

{description}

Runs without segpipe: Python with torch, monai, numpy, pillow and av (versions in
configs/metadata.json). From this folder:

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --input_dir /path/to/inputs --output_dir /path/to/outputs

Inputs: every {suffixes} file of `input_dir` ({modality}); other files are logged and left out.

Outputs: one `<file stem>.npz` per input, with
- `prob`: float16 probabilities, {shape}, rounded to 1/1024, classes in the order of `classes`;
- `mask`: uint8 0/1 of the same shape, `prob >= threshold` of the class;
- `classes`: the class names ({classes}).

Overrides: `--bundle_root DIR` to run from elsewhere; `--threads N` (default 1) and `--device cuda`
for speed. One CPU thread gives the pipeline's probabilities bit for bit (its Dask workers run one
torch thread each); more threads or a GPU round some of torch's kernels differently and may move a
few probabilities by a step of 1/1024.

Members ({n}): `models/*.ts` (TorchScript, what the bundle runs) and, where the network exports,
`models/*.onnx` (the network alone: a z-scored (N, C, H, W) float32 batch in, per-class logits out;
close to the TorchScript logits, not bit for bit). Their weights and the per-class thresholds are
in configs/inference.json and, with their provenance, under "segpipe" in configs/metadata.json.
`scripts/` is segpipe's own inference code, copied unchanged: edit it and the answers differ from
the pipeline's.
"""


def readme(dataset: str, meta: dict[str, Any], n_members: int) -> str:
    kind, classes = KINDS[dataset], meta["segpipe"]["classes"]
    suffixes = {"rgb": ".jpg/.jpeg/.png", "grey": ".png", "video": "video (.avi, .mp4, ...)"}[kind.reader]
    shape = "(T, K, H, W) for a video of T frames" if kind.reader == "video" else "(K, H, W)"
    return README.format(dataset=dataset, description=meta["description"], suffixes=suffixes, modality=kind.modality,
                         shape=shape, classes=", ".join(classes), n=n_members)


def export_member(checkpoint: Path, record: dict[str, Any], batch_size: int, models: Path) -> dict[str, Any]:
    """One member's TorchScript and ONNX files in `models`, and its entry in the bundle's configs."""
    model, meta = load_model(checkpoint, CPU)
    for key in ("arch", "fold", "val_dice"):
        if record.get(key) != meta.get(key):
            raise ConfigError(f"{checkpoint}: {key} is {meta.get(key)!r}, the ensemble record says {record.get(key)!r}: "
                              "retrained since the ensemble stage ran (dvc repro ensemble)")
    name = f"{meta['arch']}_fold{meta['fold']}"
    inputs = [example_input(meta, 1), example_input(meta, batch_size)]
    scripted, exact = to_torchscript(model, inputs)
    if not exact:
        log.warning("%s: its TorchScript does not give the checkpoint's logits bit for bit; the bundle's "
                    "probabilities may differ from the pipeline's by a rounding step", name)
    torch.jit.save(scripted, str(models / f"{name}.ts"))
    any_batch, skipped = to_onnx(model, inputs[0], models / f"{name}.onnx")
    if skipped:
        log.warning("%s: no ONNX file: %s", name, skipped)
    return {"name": name, "torchscript": f"models/{name}.ts", "torchscript_exact": exact,
            "onnx": None if skipped else f"models/{name}.onnx", "onnx_any_batch": any_batch, "onnx_skipped": skipped,
            "weight": float(record["weight"]), "tile_extent": meta_tile_extent(meta), "meta": meta}


def export_bundle(dataset: str, checkpoints: list[Path], recorded: dict[str, Any], out: Path, infer: InferConfig,
                  chunk: int) -> list[dict[str, Any]]:
    """Write the bundle of `dataset`'s ensemble to `out` (atomically; see the module doc) and return
    its members' entries (name, files, weight, meta).

    `checkpoints` are the members' best.pt in the order of `recorded` (the ensemble stage's
    reports/<dataset>/ensemble.json), `infer` the infer stage's settings (the plan's flips applied),
    `chunk` the ingest chunk (params ingest.chunk)."""
    if dataset not in KINDS:
        raise ConfigError(f"dataset {dataset!r}: no bundle reader; known: {sorted(KINDS)}")
    if len(checkpoints) != len(recorded["members"]):
        raise ConfigError(f"{len(checkpoints)} checkpoints for the {len(recorded['members'])} recorded members")
    settings = {"batch_size": infer.batch_size, "overlap": infer.overlap, "mode": infer.mode,
                "flips": [list(dims) for dims in infer.tta_flips()], "band_rows": infer.band_rows}
    with atomic_dir(out, Owner("export", dataset)) as tmp:
        for folder in ("configs", "models", "scripts", "docs"):
            (tmp / folder).mkdir()
        members = [export_member(c, r, infer.batch_size, tmp / "models")
                   for c, r in zip(checkpoints, recorded["members"])]
        classes = list(members[0]["meta"]["classes"])
        thresholds = [float(recorded["thresholds"][name]["threshold"]) for name in classes]
        meta = metadata(dataset, members, classes, recorded, settings)
        config = inference_config(dataset, members, classes, thresholds, settings, chunk)
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "configs" / "inference.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "configs" / "logging.conf").write_text(LOGGING)
        (tmp / "docs" / "README.md").write_text(readme(dataset, meta, len(members)))
        (tmp / "scripts" / "__init__.py").write_text(
            '"""segpipe\'s inference code, copied unchanged by segpipe.export: the bundle computes what the\n'
            'pipeline computes. Edit it and the answers differ."""\n')
        for name in PORTABLE:
            shutil.copyfile(SOURCE / f"{name}.py", tmp / "scripts" / f"{name}.py")
    return members
