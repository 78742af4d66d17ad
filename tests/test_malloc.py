"""keep_freed_memory: the blocks a tile loop frees are reused, not handed back and faulted in again."""
import json
import subprocess
import sys

import pytest

# Tiled prediction of one 2048 x 1024 image with a 16-channel UNet on 256 px tiles, the second of
# two runs measured: the minor page faults it costs once its memory is warm.
PREDICT = """
import json, resource, sys, numpy as np, torch
from segpipe.config import InferConfig
from segpipe.infer import predict_tiled
from segpipe.malloc import keep_freed_memory
from segpipe.train import new_model
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
torch.set_num_threads(1)
meta = {"arch": "unet", "classes": ["a", "b", "c"], "in_channels": 1, "image_size": [256, 256],
        "channels": [16, 32], "tile_scale": 1.0}
model = new_model(meta, 0).eval()
image = np.random.default_rng(0).integers(0, 255, (2048, 1024), dtype=np.uint8)
out = np.zeros((3, 2048, 1024), np.float16)
run = lambda: predict_tiled(model, meta, image, out, InferConfig(batch_size=4), torch.device("cpu"))
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PREDICT, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_tuned_malloc_lets_tiled_inference_reuse_its_memory_instead_of_faulting_it_in():
    default, tuned = faults("default"), faults("tuned")
    assert tuned["tuned"] is True
    assert tuned["faults"] < default["faults"] / 10, (default, tuned)
