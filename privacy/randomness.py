"""Where a DP mechanism's randomness comes from: a secret that never leaves the node.

The Gaussian noise, the Poisson sampling and the noisy class counts are what the guarantee
rests on, so the party the guarantee is for (the server, and whoever starts runs) must not be
able to regenerate them. Everything it knows (the run seed, the partition id, the round, the
``meta.seed`` of every upload) is public, so these draws come from a generator seeded with 64
bits from the operating system's secure source (:mod:`secrets`), drawn afresh for every
distillation and never stored, logged or uploaded.

What does not depend on the data (network initialisation, DSA draws, the synthetic set's noise
initialisation) stays seeded by the public seed: it can be reproduced and it gives nothing away.

``torch.Generator`` itself is a Mersenne Twister, not a cryptographic generator: its secret seed
stops an adversary from replaying the draws, but an adversary that sees enough raw outputs of
the same stream could in principle reconstruct its state. The releases a server sees are sums
of data and noise, never raw draws; docs/privacy.md's threat model states this limit (and the
floating-point attack on Gaussian samplers, Mironov 2012).

Tests need reproducible noise: ``insecure_reproducible_noise=True`` seeds the generator from
the public seed instead (the pre-secret behaviour, kept as the weak mechanism the audit must
break). The ClientApp refuses it.
"""

from __future__ import annotations

import secrets

import torch

SECRET_BITS = 64  # torch.Generator.manual_seed takes at most 64 bits
NOISE_STREAM = 0x5EC2E7  # offsets the insecure noise seed from the public seed's other uses


def secret_seed() -> int:
    """64 bits from the OS's secure source (``secrets``, i.e. ``os.urandom``)."""
    return secrets.randbits(SECRET_BITS)


def noise_generator(public_seed: int, insecure_reproducible_noise: bool = False,
                    device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of every draw a DP guarantee depends on.

    Secret by default: seeded by :func:`secret_seed`, which is not kept anywhere. With
    ``insecure_reproducible_noise`` it is seeded from ``public_seed``, so anyone who knows the
    seed can replay the noise: for tests and audits only, never for an upload.
    """
    gen = torch.Generator(device=device)
    if insecure_reproducible_noise:
        return gen.manual_seed((int(public_seed) * 1_000_003 + NOISE_STREAM) % 2**63)
    return gen.manual_seed(secret_seed())
