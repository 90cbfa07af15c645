"""The contract every registered parameterisation keeps, run over the registry itself.

Parametrised by ``available_parameterisations()``, never by a hand-kept list, so a new module in
``distill/params`` is held to all of it at once (and one its package forgets to import fails
``test_every_module_of_the_package_is_imported_and_registers_a_class``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distill.factors as factors_module
import distill.parameterize as compat
import distill.params as params
from distill.factors import GEOMETRY_LIMITS, Factors, check_factors
from distill.methods import make_config
from distill.params import PARAMETERISATIONS, Parameterization, available_parameterisations, parameterisation, register

NAMES = available_parameterisations()
SHAPE = (3, 8, 8)  # three channels, so a kind that confuses channels with anything else shows it
CLASSES, BASES_PER_CLASS = 2, 2
BASES = CLASSES * BASES_PER_CLASS


def _toy_init(cls: type[Parameterization], bases: int = BASES, seed: int = 0) -> torch.Tensor:
    """``real_per_base`` start images per base, for 2 classes x 2 bases, base order."""
    n = bases * cls.real_per_base({})
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _build(cls: type[Parameterization], rho: float = 0.0, seed: int = 1, bases: int = BASES) -> Parameterization:
    return cls.build(_toy_init(cls, bases), rho, torch.Generator().manual_seed(seed), {})


def _stored(p: Parameterization) -> torch.Tensor:
    """What is uploaded per base: the base array of factors, else the images."""
    f = p.factors()
    return (p.images() if f is None else f.arrays[f.base_key]).detach().clone()


def test_the_registry_holds_the_built_in_kinds_and_refuses_unknown_and_taken_names():
    assert {"pixels", "idc", "haba", "latent"} <= set(NAMES)
    with pytest.raises(ValueError, match="unknown parameterisation 'svd'; known: .*idc"):
        parameterisation("svd")
    with pytest.raises(ValueError, match="registered already"):
        register(type("Again", (Parameterization,), {"name": "idc"}))
    with pytest.raises(ValueError, match="needs a name"):
        register(type("Nameless", (Parameterization,), {}))
    assert set(PARAMETERISATIONS) == set(NAMES)


def test_every_module_of_the_package_is_imported_and_registers_a_class():
    package = Path(params.__file__).parent
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "base", "shared"}
    listed = {m.__name__.rsplit(".", 1)[-1] for m in params.MODULES}
    assert modules <= listed, f"distill/params/__init__.py's MODULES lacks {sorted(modules - listed)}"
    owners = {cls.__module__.rsplit(".", 1)[-1] for cls in PARAMETERISATIONS.values()}
    assert modules <= owners, f"modules registering no parameterisation: {sorted(modules - owners)}"


def test_the_old_tables_and_functions_are_the_registry_s():
    for name in NAMES:
        cls = parameterisation(name)
        assert compat.OPTIONS[name] == cls.options
        assert compat.check_options(name, None) == cls.check_options(None)
        assert compat.real_per_base(name, {}) == cls.real_per_base({})
        assert compat.decoded_per_base(name, {}) == cls.decoded_per_base({})
    assert compat.RHO_COMPOSES == tuple(n for n, c in PARAMETERISATIONS.items() if c.composes_with_rho)
    factorised = {n: parameterisation(n) for n in NAMES if parameterisation(n).base_key is not None}
    assert set(factors_module.KINDS) == set(factorised)
    assert factors_module.BASE_KEY == {n: c.base_key for n, c in factorised.items()}
    assert factors_module.SPEC_KEYS == {n: c.spec_keys for n, c in factorised.items()}
    with pytest.raises(AttributeError):
        factors_module.NOT_A_TABLE  # noqa: B018


@pytest.mark.parametrize("name", NAMES)
def test_class_attributes_are_declared(name):
    cls = parameterisation(name)
    assert cls.name == name and isinstance(cls.options, dict)
    assert isinstance(cls.composes_with_rho, bool) and isinstance(cls.shared_networks, bool)
    assert cls.base_key is None or isinstance(cls.base_key, str)
    assert all(isinstance(k, str) for k in cls.spec_keys)
    if cls.base_key is not None:  # every integer an upload's spec holds is bounded
        assert cls.spec_keys and all(k in cls.limits or k in GEOMETRY_LIMITS for k in cls.spec_keys)
    assert not (cls.shared_networks and cls.composes_with_rho)  # a learned network remaps the frozen pixels


@pytest.mark.parametrize("name", NAMES)
def test_options_round_trip_and_bad_ones_are_refused(name):
    cls = parameterisation(name)
    defaults = cls.check_options(None)
    assert defaults == cls.options and cls.check_options({}) == defaults
    assert cls.check_options(defaults) == defaults and cls.check_options(dict(defaults)) is not cls.options
    with pytest.raises(ValueError, match="no options"):
        cls.check_options({"no_such_option": 1})
    for key, (lo, hi) in cls.limits.items():
        if key not in cls.options:
            continue
        assert cls.check_options({key: hi})[key] == hi and cls.check_options({key: lo})[key] == lo
        for bad in (lo - 1, hi + 1, True, 1.5, "2"):
            with pytest.raises(ValueError, match=key):
                cls.check_options({key: bad})


@pytest.mark.parametrize("name", NAMES)
def test_per_base_counts_are_positive_integers(name):
    cls = parameterisation(name)
    for count in (cls.real_per_base({}), cls.decoded_per_base({})):
        assert isinstance(count, int) and not isinstance(count, bool) and count >= 1


@pytest.mark.parametrize("name", NAMES)
def test_build_gives_the_declared_images_deterministically_with_gradients_to_every_parameter(name):
    cls = parameterisation(name)
    p = _build(cls)
    images = p.images()
    assert images.shape == (BASES * cls.decoded_per_base({}), *SHAPE) and images.dtype == torch.float32
    again = _build(cls)
    assert torch.equal(again.images(), images)  # same seed, same start
    params = p.parameters()
    assert params and all(t.is_leaf and t.requires_grad for t in params)
    images.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in params)


@pytest.mark.parametrize("name", NAMES)
def test_factors_round_trip_through_distill_factors_bit_exactly_and_are_bounded(name):
    cls = parameterisation(name)
    p = _build(cls)
    f = p.factors()
    if cls.base_key is None:
        assert f is None
        return
    per = cls.decoded_per_base({})
    assert f.kind == name and f.base_key == cls.base_key and f.num_bases == BASES and f.per_base == per
    assert set(f.spec) == {"kind", *cls.spec_keys}
    assert {k: tuple(v.shape) for k, v in f.arrays.items()} == cls.expected_shapes(f.spec, SHAPE[0], BASES, *SHAPE[1:])
    back = Factors.from_json(f.spec_json(), {k: v.clone() for k, v in f.arrays.items()})  # as a receiver gets it
    assert back.spec == f.spec and check_factors(back, *SHAPE, max_images=BASES * per) is None
    assert torch.equal(back.decode(), p.images().detach())
    assert torch.equal(factors_module.decode(back.spec, back.arrays), back.decode())
    assert "at most" in check_factors(back, *SHAPE, max_images=BASES * per - 1)
    # Strict before decoding: a missing, extra or misshapen array is refused.
    for key, array in f.arrays.items():
        missing = {k: v for k, v in f.arrays.items() if k != key}
        assert check_factors(Factors(f.spec, missing), *SHAPE) is not None
        cut = {**f.arrays, key: array[..., :-1].contiguous()}
        assert "shape" in check_factors(Factors(f.spec, cut), *SHAPE)
    assert "arrays must be" in check_factors(Factors(f.spec, {**f.arrays, "extra": torch.zeros(1)}), *SHAPE)


@pytest.mark.parametrize("name", NAMES)
def test_stored_bases_decode_independently_so_cutting_classes_is_sound(name):
    """What the client relies on: cutting base rows keeps a valid set of the same images
    (shared networks kept whole); without shared networks every array is per base, so sets concatenate."""
    cls = parameterisation(name)
    if cls.base_key is None:
        return
    f = _build(cls).factors()
    per, keep = f.per_base, BASES // 2
    cut = Factors(f.spec, {**f.arrays, f.base_key: f.arrays[f.base_key][:keep].contiguous()})
    assert check_factors(cut, *SHAPE) is None and cut.num_bases == keep
    torch.testing.assert_close(cut.decode(), f.decode()[:keep * per], rtol=0, atol=1e-6)
    fewer = _build(cls, bases=BASES - 1).factors().arrays
    per_base_arrays = {k for k, v in f.arrays.items() if fewer[k].shape != v.shape}  # these grow with the bases
    assert cls.base_key in per_base_arrays
    if not cls.shared_networks:
        assert per_base_arrays == set(f.arrays)
        g = _build(cls, seed=2).factors()
        both = Factors(f.spec, {k: torch.cat([f.arrays[k], g.arrays[k]]) for k in f.arrays})
        assert check_factors(both, *SHAPE) is None
        assert torch.equal(both.decode(), torch.cat([f.decode(), g.decode()]))
    else:
        assert per_base_arrays != set(f.arrays)  # some networks are one set for every class


@pytest.mark.parametrize("name", NAMES)
def test_rho_freezes_stored_pixels_where_it_composes_and_is_refused_elsewhere(name):
    cls = parameterisation(name)
    if not cls.composes_with_rho:
        for make in (lambda: _build(cls, rho=0.5),
                     lambda: compat.make_parameterization(_toy_init(cls), 0.5, torch.Generator(), name),
                     lambda: make_config("dm", param=name, rho=0.5)):
            with pytest.raises(ValueError, match="does not compose"):
                make()
        return
    for rho, frozen_share in ((0.5, (0.35, 0.65)), (0.0, (0.0, 0.02))):
        p = _build(cls, rho=rho)
        assert p.images().shape == (BASES * cls.decoded_per_base({}), *SHAPE)
        before = _stored(p)
        opt = torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(2):
            opt.zero_grad()
            p.images().square().sum().backward()
            opt.step()
        same = (_stored(p) == before).float().mean().item()
        assert frozen_share[0] <= same <= frozen_share[1], (rho, same)
    assert not torch.equal(_stored(_build(cls, rho=0.5)), _stored(_build(cls)))
