"""The server's pool of accepted synthetic sets: the latest set of each client, merged on demand."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from distill.synthetic import SyntheticSet


class SyntheticPool:
    """Latest accepted set per client (keyed by the node id the SuperLink vouches for).

    A client's newer set replaces its older one, so an iterative run trains on each
    client's most recent view rather than counting early rounds several times.
    """

    def __init__(self) -> None:
        self._sets: dict[int, SyntheticSet] = {}

    def update(self, node_id: int, syn: SyntheticSet) -> None:
        self._sets[int(node_id)] = syn

    def __len__(self) -> int:
        return len(self._sets)

    def __contains__(self, node_id: int) -> bool:
        return int(node_id) in self._sets

    def items(self) -> list[tuple[int, SyntheticSet]]:
        return sorted(self._sets.items())

    def num_images(self) -> int:
        return sum(len(s) for s in self._sets.values())

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels, the sets in the order of their contents' digests; hard labels
        become one-hot if any set is soft.

        Not node order: Flower's simulation draws new node ids at every start, so the same sets
        would be trained on in another order, and give another global model, from run to run.
        """
        if not self._sets:
            raise ValueError("the pool is empty: no accepted synthetic sets yet")
        sets = sorted(self._sets.values(), key=_digest)
        images = torch.cat([s.images for s in sets])
        if any(s.soft_labels for s in sets):
            k = sets[0].meta.dataset.num_classes
            labels = torch.cat([s.labels if s.soft_labels else F.one_hot(s.labels, k).float() for s in sets])
        else:
            labels = torch.cat([s.labels for s in sets])
        return images, labels


def _digest(syn: SyntheticSet) -> str:
    """A set's identity by content: its images and labels, bytes and shapes."""
    h = hashlib.sha256()
    for t in (syn.images, syn.labels):
        array = t.detach().cpu().contiguous().numpy()
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()
