"""Factorised parameterisations (IDC, HaBa, latent codes) and factorised synthetic sets."""

import json

import numpy as np
import pytest
import torch

from distill.factors import Factors, check_factors
from distill.methods import distill, make_config
from distill.task import DistillTask, method_config
from distill.methods.base import generator, init_synthetic
from distill.parameterize import decoded_per_base, make_parameterization
from distill.synthetic import SetMetadata, SyntheticSet

from .conftest import SMALL_NET
from .test_method_contract import FAST, SECRET_NOISE

FACTORISED = {"idc": {"factor": 2}, "haba": {"hallucinators": 3, "hidden": 4},
              "latent": {"factor": 2, "decoders": 3, "hidden": 4}}
PER_BASE = {"idc": 4, "haba": 3, "latent": 3}


def _cfg(method="dm", param="idc", **kw):
    base = dict(ipc=2, iterations=2, arch_kwargs=SMALL_NET, batch_real=32, param=param,
                param_kwargs=FACTORISED.get(param, {}))
    if method in ("dc", "dsa"):
        base.update(outer_loop=1, inner_loop=1)
    base.update(kw)
    return make_config(method, **base)


@pytest.mark.parametrize("param", sorted(FACTORISED))
def test_decodes_to_the_declared_images_with_their_base_class_and_gradients_reach_factors(param, small_train):
    plan = init_synthetic(small_train, _cfg(param=param), generator(0))
    per = PER_BASE[param]
    assert decoded_per_base(param, FACTORISED[param]) == per
    images = plan.images()
    assert images.shape == (10 * 2 * per, 1, 28, 28) and plan.labels.tolist() == sorted(list(range(10)) * 2 * per)
    assert all(plan.slices[c] == slice(c * 2 * per, (c + 1) * 2 * per) for c in range(10))
    factors = plan.param.factors()
    assert factors.num_bases == 20 and factors.per_base == per
    assert torch.equal(factors.decode(), images.detach())  # what is stored decodes to what was trained
    images.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plan.parameters())


def test_idc_tiles_are_downsampled_real_images():
    real = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = make_parameterization(real, 0.0, torch.Generator(), "idc", {"factor": 2})
    assert p.factors().arrays["base"].shape == (2, 1, 8, 8)  # 8 images in the bytes of 2
    small = torch.nn.functional.avg_pool2d(real, 2)
    up = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(p.images(), up, atol=1e-6)


def test_a_class_with_few_samples_still_fills_every_tile(small_train):
    labels = small_train.labels
    idx = torch.cat([torch.nonzero(labels == 0).flatten()[:1], torch.nonzero(labels == 1).flatten()[:30]])
    plan = init_synthetic(small_train.subset(idx), _cfg(ipc=3), generator(0))
    assert torch.bincount(plan.labels).tolist() == [4, 12]  # 1 base for class 0 (capped), 3 for class 1


@pytest.mark.parametrize("method,param", [("dm", "idc"), ("dm", "haba"), ("dm", "latent"),
                                          ("dc", "idc"), ("dsa", "haba"), ("dsa", "latent")])
def test_methods_run_factorised_and_seeds_give_the_same_set(method, param, small_train):
    before = small_train.images.clone()
    a, b = distill(small_train, _cfg(method, param)), distill(small_train, _cfg(method, param))
    per = PER_BASE[param]
    assert a.images.shape == (20 * per, 1, 28, 28) and a.hard_labels().tolist() == sorted(list(range(10)) * 2 * per)
    assert a.factors is not None and a.factors.kind == param and a.meta.extra["param"] == param
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(a.factors.arrays[k], b.factors.arrays[k]) for k in a.factors.arrays)
    assert torch.equal(small_train.images, before)
    assert not torch.equal(a.images, distill(small_train, _cfg(method, param, seed=1)).images)


@pytest.fixture
def _expert_cache(tmp_path, monkeypatch):
    """MTT's expert buffers go to a temporary cache, never to the user's ~/.cache."""
    monkeypatch.setenv("FEDISTILL_EXPERT_CACHE", str(tmp_path))


@pytest.mark.parametrize("method", sorted(set(FAST) - set(SECRET_NOISE)))  # DP noise is secret: not reproducible
def test_every_registered_method_distills_through_idc(method, small_train, _expert_cache):
    cfg = make_config(method, ipc=1, iterations=1, arch_kwargs=SMALL_NET, param="idc", **FAST[method])
    a, b = distill(small_train, cfg), distill(small_train, cfg)
    assert len(a) == 40 and a.hard_labels().tolist() == sorted(list(range(10)) * 4)
    assert a.factors.num_bases == 10 and torch.equal(a.factors.arrays["base"], b.factors.arrays["base"])


def test_dm_with_idc_loss_decreases(small_train):
    losses = []
    syn = distill(small_train, _cfg(iterations=30, init="noise", ipc=1), callback=lambda it, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    start = distill(small_train, _cfg(iterations=0, init="noise", ipc=1))
    assert (syn.factors.arrays["base"] - start.factors.arrays["base"]).abs().mean() > 0.01


def test_bytes_count_the_factors_not_the_decoded_images(small_train):
    syn = distill(small_train, _cfg(iterations=0, ipc=1))
    plain = distill(small_train, _cfg(param="pixels", iterations=0, ipc=1))
    spec = len(syn.factors.spec_json().encode())
    assert len(syn) == 4 * len(plain)
    assert syn.nbytes() == 10 * 28 * 28 * 4 + 40 * 8 + spec  # one stored image per class + 40 labels
    assert syn.nbytes() - 30 * 8 - spec == plain.nbytes()  # same image bytes as IPC 1 pixels
    assert set(syn.to_arrays()) == {"factors_json", "factor_base", "labels"}
    assert set(plain.to_arrays()) == {"images", "labels"}  # sets without factors are unchanged


@pytest.mark.parametrize("param", sorted(FACTORISED))
def test_save_load_and_wire_round_trip_bit_exactly(param, small_train, tmp_path):
    syn = distill(small_train, _cfg(param=param, iterations=1))
    for back in (SyntheticSet.load(syn.save(tmp_path / "s.npz")),
                 SyntheticSet.from_arrays(syn.to_arrays(), SetMetadata.from_dict(syn.meta.to_dict()))):
        assert back.factors.spec == syn.factors.spec and back.meta == syn.meta
        assert set(back.factors.arrays) == set(syn.factors.arrays)
        assert all(torch.equal(back.factors.arrays[k], v) for k, v in syn.factors.arrays.items())
        assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
        assert "images" not in f.files  # the decoded images are never stored


def test_soft_labels_and_lr_travel_with_factors(tmp_path):
    info = _info()
    factors = _idc_factors()
    soft = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(1)), 1)
    s = SyntheticSet.from_factors(factors, soft, SetMetadata(info, "kip", 1), lr=0.02)
    back = SyntheticSet.load(s.save(tmp_path / "s.npz"))
    assert torch.equal(back.labels, soft) and back.lr == pytest.approx(0.02)


def test_pickled_factor_content_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    good = SyntheticSet.from_factors(_idc_factors(), torch.arange(8) // 4, SetMetadata(_info(), "dm", 1))
    arrays = good.to_arrays()
    arrays["factor_base"] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **arrays, meta_json=np.asarray(json.dumps(good.meta.to_dict())))
    with pytest.raises(ValueError, match="refused|pickle"):
        SyntheticSet.load(path)


def _info():
    from distill.data import DatasetInfo

    return DatasetInfo("mnist10k", 10, 1, 28, 28, (0.1307,), (0.3081,))


def _idc_factors(bases=2):
    spec = {"kind": "idc", "factor": 2, "height": 28, "width": 28}
    return Factors(spec, {"base": torch.randn(bases, 1, 28, 28, generator=torch.Generator().manual_seed(0))})


def _spec_bytes(spec):
    return np.frombuffer(json.dumps(spec).encode(), dtype=np.uint8).copy()


@pytest.mark.parametrize("change,reason", [
    ({"factors_json": _spec_bytes({"kind": "svd", "rank": 2})}, "kind must be one of"),
    ({"factors_json": _spec_bytes({"kind": "idc", "factor": 2, "height": 28, "width": 28, "x": 1})}, "spec keys"),
    ({"factors_json": _spec_bytes({"kind": "idc", "factor": 9, "height": 28, "width": 28})}, r"factor=9"),
    ({"factors_json": _spec_bytes({"kind": "idc", "factor": 2, "height": 32, "width": 32})}, "32x32"),
    ({"factors_json": np.frombuffer(b"{not json", dtype=np.uint8).copy()}, "unreadable"),
    ({"factors_json": np.zeros(3, np.float32)}, "uint8"),
    ({"factor_base": np.zeros((2, 1, 26, 28), np.float32)}, "shape"),
    ({"factor_base": np.full((2, 1, 28, 28), np.inf, np.float32)}, "NaN or Inf"),
    ({"factor_base": np.zeros((2, 1, 28, 28), np.float64)}, "float32"),
    ({"factor_extra": np.zeros(3, np.float32)}, "factor arrays must be"),
    ({"images": np.zeros((8, 1, 28, 28), np.float32)}, "unexpected"),
    ({"labels": np.array([0, 0, 0, 1, 1, 1, 1, 1], np.int64)}, "one stored base"),
    ({"labels": np.zeros(6, np.int64)}, r"labels \(6,\) int64 for 8 images"),
])
def test_bad_factor_arrays_are_rejected_with_a_reason(change, reason):
    good = SyntheticSet.from_factors(_idc_factors(), torch.arange(8) // 4, SetMetadata(_info(), "dm", 1))
    arrays = dict(good.to_arrays(), **change)
    with pytest.raises(ValueError, match=reason):
        SyntheticSet.from_arrays(arrays, good.meta)


def test_decoded_size_is_bounded_before_decoding():
    f = _idc_factors(bases=5)
    assert check_factors(f, 1, 28, 28, max_images=20) is None
    assert "at most 10" in check_factors(f, 1, 28, 28, max_images=10)
    with pytest.raises(ValueError, match="differ from the decoding"):
        SyntheticSet(torch.zeros(20, 1, 28, 28), torch.arange(20) // 4 % 10, SetMetadata(_info(), "dm", 1), factors=f)


def test_rho_composes_with_idc_and_is_refused_for_learned_decoders(small_train):
    base = dict(rho=0.5, init="noise", lr_img=5.0)
    start = distill(small_train, _cfg(iterations=0, **base)).factors.arrays["base"]
    end = distill(small_train, _cfg(iterations=4, **base)).factors.arrays["base"]
    mask = init_synthetic(small_train, _cfg(**base), generator(0)).param.stored.mask.cpu()
    assert torch.equal(end[mask], start[mask]) and not torch.equal(end[~mask], start[~mask])
    for param in ("haba", "latent"):
        with pytest.raises(ValueError, match="does not compose"):
            _cfg(param=param, rho=0.1)


def test_options_are_validated_and_coerced_from_run_config():
    with pytest.raises(ValueError, match="known: .*idc"):
        make_config("dm", param="svd")
    with pytest.raises(ValueError, match="no options"):
        make_config("dm", param="idc", param_kwargs={"factors": 2})
    with pytest.raises(ValueError, match="factor"):
        make_config("dm", param="idc", param_kwargs={"factor": 0})
    with pytest.raises(ValueError, match="net_lr"):
        make_config("dm", param="haba", param_kwargs={"net_lr": -1})
    task = DistillTask.from_config({"param": "idc", "param-kwargs": '{"factor": 3}'})  # run-config text
    got = method_config(task, seed=0)
    assert (got.param, got.param_kwargs) == ("idc", {"factor": 3})


def test_class_groups_concatenate_for_idc_and_plain_sets_but_not_learned_decoders(small_train):
    from distill.synthetic import concat_sets

    two = small_train.subset(torch.nonzero(small_train.labels < 2).flatten())
    rest = small_train.subset(torch.nonzero(small_train.labels >= 2).flatten())
    a, b = distill(two, _cfg(ipc=2, iterations=0)), distill(rest, _cfg(ipc=1, iterations=0))
    both = concat_sets([a, b], a.meta)
    assert both.factors.num_bases == 4 + 8 and torch.equal(both.images, torch.cat([a.images, b.images]))
    assert both.nbytes() == a.nbytes() + b.nbytes() - len(a.factors.spec_json())  # one spec
    p, q = (distill(d, _cfg(param="pixels", iterations=0)) for d in (two, rest))
    assert len(concat_sets([p, q], p.meta)) == 20
    h = distill(two, _cfg(param="haba", iterations=0))
    with pytest.raises(ValueError, match="only plain sets"):
        concat_sets([h, h], h.meta)
    with pytest.raises(ValueError, match="only plain sets"):
        concat_sets([a, p], a.meta)
