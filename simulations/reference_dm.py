"""Time the reference DM iteration (VICO-UoE/DatasetCondensation, ``main_DM.py``) beside ours.

The reference repository is not part of fedistill: point ``--reference-dir`` at a checkout of
it. This module imports the reference's own ``utils.py`` (its ConvNet, ``DiffAugment`` and
``ParamDiffAug``) and drives one outer iteration the way ``main_DM.py`` does for ConvNet —
per class: sample 256 real images, one DSA seed shared by the real and synthetic batch,
embed the real batch with autograd and detach, embed the synthetic batch, add the squared
distance of the means; then one SGD step (lr 1, momentum 0.5) on the images. Only the loop
is re-expressed here (it is a few lines); every module it calls is the reference's.
"""

from __future__ import annotations

import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from distill.data import LabeledImages


def load_reference_utils(ref_dir: str) -> types.ModuleType:
    """Import the reference ``utils.py`` with one compatibility fix applied in memory.

    Its siamese crop/cutout write ``t[:] = t[0]``, which torch >= 2.1 refuses (the source and
    target alias); ``t[:] = t[0].clone()`` computes the same values. The checkout is untouched.
    """
    if ref_dir not in sys.path:
        sys.path.insert(0, ref_dir)  # for its `from networks import ...`
    source = (Path(ref_dir) / "utils.py").read_text()
    source, fixes = re.subn(r"(\w+)\[:\] = \1\[0\]\n", r"\1[:] = \1[0].clone()\n", source)
    module = types.ModuleType("reference_utils")
    module.__file__ = str(Path(ref_dir) / "utils.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    module.COMPAT_FIXES = fixes
    return module


class ReferenceDM:
    """State of one reference DM run: real images by class, synthetic images, optimiser."""

    def __init__(self, reference_dir: str | Path, real: LabeledImages, ipc: int,
                 batch_real: int = 256, device: str = "cpu", seed: int = 0) -> None:
        ref_dir = str(Path(reference_dir).resolve())
        if not (Path(ref_dir) / "utils.py").is_file():
            raise FileNotFoundError(f"{ref_dir} is not a DatasetCondensation checkout (no utils.py)")
        self.ref = load_reference_utils(ref_dir)
        info = real.info
        self.channel, self.im_size, self.num_classes = info.channels, (info.height, info.width), info.num_classes
        self.ipc, self.batch_real, self.device = ipc, batch_real, device
        self.images_all = real.images.to(device)
        self.indices_class = [idx.numpy() for idx in real.class_indices()]
        self.rng = np.random.default_rng(seed)
        self.param = self.ref.ParamDiffAug()
        self.strategy = "color_crop_cutout_flip_scale_rotate"
        init = torch.cat([self.get_images(c, ipc) for c in range(self.num_classes)])
        self.image_syn = init.detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.image_syn], lr=1.0, momentum=0.5)

    def get_images(self, c: int, n: int) -> torch.Tensor:
        return self.images_all[self.rng.permutation(self.indices_class[c])[:n]]

    def step(self) -> float:
        net = self.ref.get_network("ConvNet", self.channel, self.num_classes, self.im_size).to(self.device)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        loss = torch.tensor(0.0, device=self.device)
        for c in range(self.num_classes):
            img_real = self.get_images(c, self.batch_real)
            img_syn = self.image_syn[c * self.ipc:(c + 1) * self.ipc]
            seed = int(time.time() * 1000) % 100000  # as the reference does
            img_real = self.ref.DiffAugment(img_real, self.strategy, seed=seed, param=self.param)
            img_syn = self.ref.DiffAugment(img_syn, self.strategy, seed=seed, param=self.param)
            # 1-channel crops come back with channels-last strides, which the reference's
            # `embed` (.view) rejects on current torch: restore standard strides, same values.
            img_real = img_real.clone(memory_format=torch.contiguous_format)
            img_syn = img_syn.clone(memory_format=torch.contiguous_format)
            out_real = net.embed(img_real).detach()
            out_syn = net.embed(img_syn)
            loss = loss + torch.sum((out_real.mean(0) - out_syn.mean(0)) ** 2)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return float(loss.detach()) / self.num_classes
