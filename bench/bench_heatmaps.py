#!/usr/bin/env python3
"""What a heatmap costs: class activation maps against torchxrayvision's input-gradient saliency.

Both on the same real inputs (corpus chest X-rays, preprocessed as process_dicom.py does),
with the random-weights DenseNet of the tests (speed does not depend on the weights), in
eager PyTorch on the CPU, fp32, one image at a time and in batches:

- **forward**: the network up to its logits, what classification costs anyway;
- **forward + CAM**: the same pass also returning every label's class activation map
  (``cxrsr.model.classifier._network_module``: a 1x1 convolution of the last feature map with the
  classifier's weights), then the 224x224 8-bit map of one label (``heatmap_image``);
- **input gradient, 1 label / 18 labels**: torchxrayvision's saliency (its README and
  ``scripts/process_image.py --saliency``): ``torch.autograd.grad`` of one output with
  respect to the input image, a backward pass per label.

Run: ``.venv/bin/python bench/bench_heatmaps.py [--repeats 3]``. It prints milliseconds per
image (CPU time, all threads) for each and the extra cost over the forward pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr.classify import prepare
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import Source
from cxrsr.model.heatmaps import heatmap_image

CORPUS = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
NAMES = (
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr05_dx_canon_966_fixed_j2kr.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr10_nih_dx_8bit.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
    "cxr07_barre_CR-MONO1-10-chest_nometa.dcm",
    "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm",
)


def timed(function: Callable[[], None], repeats: int) -> float:
    """Best CPU seconds (all threads) of ``repeats`` calls: less sensitive to other
    processes on a shared machine than wall time."""
    function()  # warm-up (allocations, oneDNN kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    args = parser.parse_args()

    import torch
    import torchxrayvision as xrv

    from cxrsr.model.classifier import _network_module

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()  # random weights: same speed
    inputs = np.stack([prepare(Source(str(CORPUS / name))).model_input for name in NAMES])
    batch = torch.from_numpy(inputs[: args.batch].astype(np.float32))
    n = batch.shape[0]
    network = _network_module(model)
    labels = list(range(model.classifier.out_features))

    def forward() -> None:
        with torch.inference_mode():
            model.classifier(model.features2(batch))

    def forward_cam() -> None:
        with torch.inference_mode():
            _logits, cams = network(batch)
        maps = cams.numpy()
        for image in maps:
            heatmap_image(image[labels[0]])

    def gradient(count: int) -> None:
        x = batch.clone().requires_grad_(True)
        outputs = model.classifier(model.features2(x))
        for k in labels[:count]:
            (grad,) = torch.autograd.grad(outputs[:, k].sum(), x, retain_graph=True)
            (grad**2).numpy()

    base = timed(forward, args.repeats) / n
    rows = [
        ("forward (logits)", base),
        ("forward + CAM (all labels) + 1 map", timed(forward_cam, args.repeats) / n),
        ("input gradient, 1 label", timed(lambda: gradient(1), args.repeats) / n),
        (
            f"input gradient, {len(labels)} labels",
            timed(lambda: gradient(len(labels)), args.repeats) / n,
        ),
    ]
    print(f"eager PyTorch, CPU, fp32, batch {n}, threads {torch.get_num_threads()}")
    for name, seconds in rows:
        extra = (seconds - base) / base
        print(f"  {name:38s} {1000 * seconds:8.1f} CPU ms/image   {extra:+7.1%} over forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
