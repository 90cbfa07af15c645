"""DOORPING (Liu, Li, Backes, Shen & Zhang, NDSS 2023): the trigger is optimised *during* distillation.

Between outer distillation iterations the attacker (1) trains a proxy network a few steps on
the current poisoned real data, (2) picks the top-k units of its feature layer (largest summed
|weight| into the classifier), (3) optimises the trigger with Adam, inside the patch only,
until those units reach ``alpha`` times their initial activation on stamped images, and (4)
re-stamps the poisoned real images with the new trigger. Trigger and networks co-evolve.

Three additions of ours, each switchable (docs/attacks.md, "DOORPING adaptation", has the probes
behind them):

- ``restamp``: once distillation ends, the final trigger is stamped on the synthetic images that
  *started* as poisoned real images (real initialisation keeps many of them as the set's
  carriers). Otherwise those carriers hold the trigger of the round they were drawn in, not the
  one the attacker fires at test time. The attacker controls distillation, so this is in its
  threat model; pixel sets from real initialisation without KIP-rho only (else a no-op).
- ``target_weight``: the trigger loss adds the proxy's cross-entropy towards the target class on
  stamped images, so the trigger is one the proxy already reads as the target.
- ``contrast_weight``: the trigger loss rewards the patch's squared distance from the clean
  images' mean patch region. The paper's neuron objective (with or without the target term)
  drives a patch on MNIST's black corner towards dark values, where it stops being distinctive.

The paper's networks are the ones trained inside DC/DD; DM draws a fresh random network
every iteration, so here a persistent proxy plays that role for every method. The update runs
as the method's per-iteration callback and re-stamps the real images *in place*: the method's
real-batch sampler holds the same tensor (the data is moved to the method's device first, so
``.to(device)`` inside the method is a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from distill.data import LabeledImages
from distill.methods import MethodConfig, distill
from distill.methods.base import initial_sources
from distill.networks import seeded_network
from distill.synthetic import SyntheticSet

from .backdoor import Trigger, poison

# Every method that draws its real batches through distill.methods.base.RealSampler (which shares
# the tensor the callback re-stamps); MTT is out: its expert trajectories are trained before distilling.
SUPPORTED = ("dm", "dc", "dsa", "cafe", "kip", "rfad", "frepo", "bptt")


@dataclass(frozen=True)
class DoorpingConfig:
    """Attack settings: the paper's (Adam lr 0.08, alpha 10) scaled down for CPU, plus our three
    additions (module docstring), on by default; ``restamp=False, target_weight=0,
    contrast_weight=0`` is the paper's attack."""

    target: int = 0
    fraction: float = 0.01
    size: int = 2
    margin: int = 1
    update_every: int = 10
    trigger_steps: int = 50
    trigger_lr: float = 0.08
    alpha: float = 10.0
    top_k: int = 1
    proxy_steps: int = 20
    proxy_lr: float = 0.01
    proxy_batch: int = 128
    warmup_rounds: int = 0  # updates before the first distillation iteration (docs/attacks.md)
    start: str = "random"  # the paper's random patch, or "white": the naive trigger, then optimised
    restamp: bool = True  # stamp the final trigger on the set's carriers (module docstring)
    target_weight: float = 1.0  # proxy cross-entropy towards ``target`` in the trigger loss; 0 = the paper's
    contrast_weight: float = 1.0  # reward for the patch departing from the clean images' patch region; 0 = the paper's
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update_every < 1 or self.trigger_steps < 1 or self.top_k < 1:
            raise ValueError(f"update_every, trigger_steps, top_k must be >= 1: {self}")
        if self.proxy_steps < 0 or self.warmup_rounds < 0:
            raise ValueError(f"proxy_steps and warmup_rounds must be >= 0: {self}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.target_weight < 0 or self.contrast_weight < 0:
            raise ValueError(f"target_weight and contrast_weight must be >= 0: {self}")
        if self.start not in ("random", "white"):
            raise ValueError(f"start must be 'random' or 'white', got {self.start!r}")


class TriggerUpdater:
    """The callback that co-evolves the trigger; ``history`` keeps a copy of every trigger used."""

    def __init__(self, data: LabeledImages, poisoned: np.ndarray, trigger: Trigger, method: MethodConfig,
                 config: DoorpingConfig) -> None:
        self.data, self.trigger, self.config = data, trigger, config
        self.poisoned = torch.as_tensor(poisoned, dtype=torch.long, device=data.images.device)
        info = data.info
        self.proxy = seeded_network(method.arch, info.channels, info.num_classes, (info.height, info.width),
                                    seed=config.seed + 7, device=data.images.device, **method.arch_kwargs)
        self.opt = torch.optim.SGD(self.proxy.parameters(), lr=config.proxy_lr, momentum=0.9)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.lo, self.hi = (Trigger.solid(info, 1, v, 0).pattern for v in (0.0, 1.0))  # [C, 1, 1] pixel bounds
        # The clean images never change, so neither does the corner the contrast term moves away from.
        rows, cols = trigger.region(info.height, info.width)
        clean = torch.as_tensor(np.setdiff1d(np.arange(len(data)), poisoned)[:256], device=data.images.device)
        self.background = data.images[clean][:, :, rows, cols].mean(0)
        self.history: list[torch.Tensor] = [trigger.pattern.detach().clone()]

    def __call__(self, iteration: int, loss: float) -> None:
        if (iteration + 1) % self.config.update_every:
            return
        self.update()

    def update(self) -> None:
        """One round: train the proxy, optimise the trigger, re-stamp the poisoned real images."""
        self._train_proxy()
        self._optimise_trigger()
        with torch.no_grad():
            self.data.images[self.poisoned] = self.trigger.stamp(self.data.images[self.poisoned])
        self.history.append(self.trigger.pattern.detach().clone())

    def warm_up(self) -> None:
        """``warmup_rounds`` updates before distillation starts, so a real-initialised synthetic
        set starts from images that carry (nearly) the final trigger rather than the random one."""
        for _ in range(self.config.warmup_rounds):
            self.update()

    def _train_proxy(self) -> None:
        self.proxy.train()
        n = len(self.data)
        for _ in range(self.config.proxy_steps):
            idx = torch.randint(n, (min(self.config.proxy_batch, n),), generator=self.gen).to(self.data.images.device)
            loss = F.cross_entropy(self.proxy(self.data.images[idx]), self.data.labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.proxy.eval()

    def _optimise_trigger(self) -> None:
        """Raise the top-k feature units towards ``alpha`` x their initial activation (MSE, as the paper),
        plus ``target_weight`` x the proxy's cross-entropy towards the target on stamped images, minus
        ``contrast_weight`` x the patch's mean squared distance from the clean images' patch region."""
        for p in self.proxy.parameters():
            p.requires_grad_(False)
        weight = self.proxy.classifier.weight.abs().sum(0)
        units = torch.topk(weight, min(self.config.top_k, weight.numel())).indices
        x = self.data.images[self.poisoned[:64]] if len(self.poisoned) else self.data.images[:64]
        pattern = self.trigger.pattern.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([pattern], lr=self.config.trigger_lr)
        probe = Trigger(pattern, self.trigger.margin, self.trigger.corner)
        with torch.no_grad():
            goal = self.config.alpha * self.proxy.embed(probe.stamp(x))[:, units].mean(0).clamp_min(1e-3)
        target = torch.full((len(x),), self.config.target, dtype=torch.long, device=x.device)
        for _ in range(self.config.trigger_steps):
            emb = self.proxy.embed(probe.stamp(x))
            loss = F.mse_loss(emb[:, units].mean(0), goal)
            if self.config.target_weight:
                loss = loss + self.config.target_weight * F.cross_entropy(self.proxy.classifier(emb), target)
            if self.config.contrast_weight:
                loss = loss - self.config.contrast_weight * (pattern - self.background).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # stay a valid image: pixel values in [0, 1]
                pattern.copy_(torch.maximum(torch.minimum(pattern, self.hi), self.lo))
        self.trigger = Trigger(pattern.detach(), self.trigger.margin, self.trigger.corner)
        for p in self.proxy.parameters():
            p.requires_grad_(True)


def doorping_distill(real: LabeledImages, method: MethodConfig,
                     config: DoorpingConfig) -> tuple[SyntheticSet, Trigger, TriggerUpdater]:
    """Poison ``real`` with a random trigger, distill while optimising it; returns set, final trigger, updater."""
    if method.method not in SUPPORTED:
        raise ValueError(f"DOORPING is wired for {SUPPORTED}, got method {method.method!r}")
    info = real.info
    if config.start == "white":
        trigger = Trigger.solid(info, config.size, 1.0, config.margin)
    else:  # uniform pixel values in [0, 1], normalised
        black, white = (Trigger.solid(info, config.size, v, config.margin).pattern for v in (0.0, 1.0))
        u = torch.rand(info.channels, config.size, config.size, generator=torch.Generator().manual_seed(config.seed))
        trigger = Trigger(black + (white - black) * u, config.margin)
    data, idx = poison(real, trigger, config.fraction, config.target, seed=config.seed)
    data = data.to(method.device)
    updater = TriggerUpdater(data, idx, trigger, method, config)
    updater.warm_up()
    syn = distill(data, replace(method, seed=method.seed), callback=updater)
    if config.restamp:
        syn = restamp_carriers(syn, data, idx, method, updater.trigger)
    return syn, updater.trigger, updater


def carrier_rows(real: LabeledImages, poisoned: np.ndarray, method: MethodConfig) -> np.ndarray:
    """Rows of ``method``'s synthetic set that start as one of the ``poisoned`` real images
    (empty where the set does not start from real pixels one for one)."""
    if method.init != "real" or method.param != "pixels" or method.rho > 0:
        return np.empty(0, dtype=np.int64)
    sources = initial_sources(real, method).cpu().numpy()
    return np.flatnonzero(np.isin(sources, poisoned))


def restamp_carriers(syn: SyntheticSet, real: LabeledImages, poisoned: np.ndarray, method: MethodConfig,
                     trigger: Trigger) -> SyntheticSet:
    """``syn`` with ``trigger`` pasted, exactly, on its carriers (:func:`carrier_rows`)."""
    rows = torch.as_tensor(carrier_rows(real, poisoned, method), dtype=torch.long)
    if not len(rows):  # also every factorised set: carrier_rows covers pixel sets only
        return syn
    images = syn.images.detach().clone()
    with torch.no_grad():
        images[rows] = trigger.stamp(images[rows])
    return replace(syn, images=images)
