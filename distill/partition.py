"""Split a training set across federated clients: IID, Dirichlet label skew, label shards.

Each partitioner returns one index array per client; every sample lands in exactly one
client, and the same seed gives the same split. ``flwr-datasets`` has equivalents, but it
works on Hugging Face datasets and would pull Flower into ``distill/``, which must stay
Flower-free, so these few lines live here.
"""

from __future__ import annotations

import numpy as np

PARTITIONERS = ("iid", "dirichlet", "shards")


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal out near-equal slices."""
    _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
              min_size: int = 0, max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class's samples are split by proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives clients dominated by one or two classes; large alpha tends
    to IID. Draws are repeated (at most ``max_tries``) until every client holds ``min_size``.
    """
    _check(labels, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet(alpha={alpha}) split of {len(labels)} samples over {num_clients} "
                     f"clients gave every client >= {min_size} samples in {max_tries} tries")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2,
           seed: int = 0) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut into equal shards, give each client k shards."""
    _check(labels, num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    n_shards = num_clients * shards_per_client
    if n_shards > len(labels):
        raise ValueError(f"{n_shards} shards requested but only {len(labels)} samples")
    rng = np.random.default_rng(seed)
    by_label = np.argsort(labels, kind="stable")
    pieces = np.array_split(by_label, n_shards)
    order = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in order]


def partition(labels: np.ndarray, num_clients: int, method: str = "iid", *, alpha: float = 0.5,
              shards_per_client: int = 2, seed: int = 0, min_size: int = 0) -> list[np.ndarray]:
    """Dispatch by name: ``iid``, ``dirichlet`` (uses ``alpha``) or ``shards``."""
    labels = np.asarray(labels)
    if method == "iid":
        return iid(labels, num_clients, seed)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    if method == "shards":
        return shards(labels, num_clients, shards_per_client, seed)
    raise ValueError(f"unknown partitioner {method!r}; known: {list(PARTITIONERS)}")


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``[num_clients, num_classes]`` sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def client_seed(run_seed: int, partition_id: int, round_: int = 1) -> int:
    """A per-client, per-round seed: distinct clients never share random draws."""
    return int(np.random.SeedSequence([run_seed, partition_id, round_]).generate_state(1)[0] % (2**31))


def split_held_out(part: np.ndarray, run_seed: int, partition_id: int,
                   holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of a simulated client's partition ``part``, both sorted.

    A seeded ``holdout_fraction`` is held out for federated evaluation; the client distills the
    rest. The client and the attacks' membership audit (which must know exactly which images
    went into distillation) both derive the split here, so they cannot disagree.
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    idx = np.random.default_rng(client_seed(run_seed, partition_id, 0)).permutation(np.asarray(part))
    n_hold = int(round(holdout_fraction * len(idx)))
    return np.sort(idx[n_hold:]), np.sort(idx[:n_hold])


def _check(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(f"{num_clients} clients but only {len(labels)} samples")
