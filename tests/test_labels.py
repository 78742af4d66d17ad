import numpy as np

from segpipe.labels import copy_labels
from segpipe.store import CaseStore


def test_given_masks_are_copied_with_case_attrs_and_unlabelled_cases_left_out(disc_stores, tmp_path):
    _, labelled = disc_stores
    images = CaseStore.create(tmp_path / "mixed.zarr", dataset="discs", classes=["disc"])
    for case_id in labelled.case_ids()[:3]:
        images.write_case(case_id, labelled.case_attrs(case_id))
        images.write_array(case_id, "mask", labelled.array(case_id, "mask")[:])
    images.write_case("unlabelled", {"group": "g9", "kind": "image"})

    summary = copy_labels(images, tmp_path / "labels.zarr")

    out = CaseStore(tmp_path / "labels.zarr")
    assert summary == {"origin": "ingest", "cases": 3, "unlabelled": 1}
    assert out.case_ids() == labelled.case_ids()[:3] and out.classes == ["disc"]
    for case_id in out.case_ids():
        assert np.array_equal(out.array(case_id, "mask")[:], labelled.array(case_id, "mask")[:])
        files = sorted(p.relative_to(images.path) for p in (images.path / case_id / "mask").rglob("*") if p.is_file())
        assert len(files) >= 2  # metadata and chunks: the ingest store's files, linked, not written again
        for name in files:
            assert (out.path / name).samefile(images.path / name)
        assert out.case_attrs(case_id)["group"] == labelled.case_attrs(case_id)["group"]
