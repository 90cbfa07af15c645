"""Model-side client work, free of Flower: local SGD for the FedAvg baseline, and evaluation.

Both use the same ConvNet as the fedistill server's global model, so the baseline differs
from fedistill only in what travels (weights every round vs one synthetic set).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.data import DatasetInfo, LabeledImages
from distill.networks import get_network, network_for
from distill.train import accuracy_and_loss

from distill.task import DistillTask


def build_network(task: DistillTask, info: DatasetInfo, seed: int = 0) -> nn.Module:
    """The run's ConvNet (width/depth from the task) for ``info``'s image geometry."""
    return network_for(info, seed=seed, width=task.net_width, depth=task.net_depth)


def expected_state(task: DistillTask, info: DatasetInfo) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of :func:`build_network`'s state, computed without allocating it.

    Built on PyTorch's ``meta`` device, so a task asking for a huge network costs nothing to size
    (the node checks sizes and a received global model against this before building anything).
    """
    with torch.device("meta"):
        net = get_network("convnet", info.channels, info.num_classes, (info.height, info.width),
                          width=task.net_width, depth=task.net_depth)
    return {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}


def train_local(net: nn.Module, data: LabeledImages, task: DistillTask, seed: int) -> nn.Module:
    """Plain FedAvg local update: ``local_epochs`` of SGD (momentum 0.9) over the local data."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=task.local_lr, momentum=0.9)
    net.train()
    for _ in range(task.local_epochs):
        for idx in torch.randperm(len(data), generator=gen).split(task.local_batch_size):
            loss = F.cross_entropy(net(data.images[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def evaluate_model(net: nn.Module, data: LabeledImages, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``net`` on ``data``; (nan, nan) when ``data`` is empty."""
    return accuracy_and_loss(net, data, batch_size)


def state_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays (what goes on the wire)."""
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def load_state(net: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    """Load wire arrays into ``net``; shape or key mismatches raise (``strict=True``)."""
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)
    return net
