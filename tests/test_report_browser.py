"""Each dataset's report.html, opened in headless Chromium as a person would open it: it loads with
no console error, every image decodes, and what shows is not a blank page."""
import io

import numpy as np
import pytest
from PIL import Image

from tests.browser import check_page

DATASETS = ("kvasir", "usc_timit", "hand_xray")


def blank(png: bytes) -> bool:
    """A screenshot with (almost) nothing drawn on it: one flat colour."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    return grey.std() < 2 or np.mean(grey < 250) < 0.005


def test_the_check_sees_a_console_error_an_image_that_does_not_decode_and_a_blank_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="data:image/png;base64,AAAA"><img src="missing.png">'
                   '<script>console.error("boom")</script></body></html>')
    page = check_page(bad)
    assert page.image_widths == [0, 0]
    assert any("boom" in e for e in page.errors) and any("missing.png" in e or "ERR_FILE" in e for e in page.errors)
    assert blank(page.screenshot)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_each_demo_report_loads_cleanly_with_every_image_decoded(trained_repo, dataset):
    page = check_page(trained_repo / "reports" / dataset / "report.html")
    assert page.errors == []
    assert len(page.image_widths) >= 3 and min(page.image_widths) > 0  # worst cases, Dice per class, ...
    assert not blank(page.screenshot)
