import pytest
import torch

from distill.networks import NETWORKS, embed_in_chunks, get_network, seeded_network


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_every_network_runs_forward_and_backward(name, channels, size):
    net = get_network(name, channels, 10, (size, size))
    x = torch.randn(2, channels, size, size, requires_grad=True)
    out = net(x)
    assert out.shape == (2, 10)
    assert net.embed(x).shape[0] == 2
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("kw", [dict(norm="batchnorm", activation="sigmoid", pooling="maxpool"),
                                dict(norm="layernorm", activation="leakyrelu", pooling="none", depth=2),
                                dict(norm="none", activation="gelu", width=8, depth=4)])
def test_convnet_variants(kw):
    assert get_network("convnet", 1, 10, (28, 28), **kw)(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_seeded_networks_are_reproducible_and_chunked_embedding_matches():
    a, b = seeded_network("convnet", 1, 10, (28, 28), seed=5), seeded_network("convnet", 1, 10, (28, 28), seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x = torch.randn(10, 1, 28, 28)
    torch.testing.assert_close(embed_in_chunks(a, x, chunk=3), a.embed(x), rtol=1e-5, atol=1e-5)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown network"):
        get_network("vgg99", 1, 10, (28, 28))
    with pytest.raises(ValueError, match="unknown norm"):
        get_network("convnet", 1, 10, (28, 28), norm="weird")
