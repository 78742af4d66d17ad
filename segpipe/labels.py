"""Training labels of a dataset, as one store per dataset whatever their origin.

Every dataset's training and evaluation read masks from `data/labels/<dataset>.zarr`: the masks
that came with the data (the ingest store's files, hard-linked) or pseudo-labels. One path pattern lets
the DVC stage graph stay the same for labelled and unlabelled datasets.
"""
from __future__ import annotations

from pathlib import Path

from segpipe.atomic import Owner, atomic_dir
from segpipe.store import CaseStore


def copy_labels(images: CaseStore, out: Path) -> dict:
    """Write the masks of every labelled case of an ingest store into a labels store at `out`."""
    labelled = [c for c in images.case_ids() if images.has(c, "mask")]
    with atomic_dir(out, Owner("labels", images.attrs["dataset"])) as tmp:
        store = CaseStore.create(tmp, dataset=images.attrs["dataset"], classes=images.classes, origin="ingest")
        for case_id in labelled:  # the same files: linked, not read and written again
            store.write_case(case_id, images.case_attrs(case_id))
            store.link_array(images, case_id, "mask")
    return {"origin": "ingest", "cases": len(labelled), "unlabelled": len(images.case_ids()) - len(labelled)}
