"""nvcim.torch: runs where torch is installed (`.venv-bench`); skipped cleanly elsewhere."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed in this venv")

import nvcim  # noqa: E402
import nvcim.torch as nt  # noqa: E402


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    )


def test_perturbed_is_nvcim_perturb_in_layer_order_and_restores():
    net = small_net()
    clean = [m.weight.detach().clone() for m in nt.weight_layers(net)]
    cfg = nvcim.VariationConfig(sigma=0.4)
    with nt.perturbed(net, cfg, seed=3, run=2) as m:
        for l, (mod, w) in enumerate(zip(nt.weight_layers(m), clean)):
            want = nvcim.perturb(w.numpy(), cfg, 3, 2, l)
            assert np.array_equal(mod.weight.detach().numpy(), want)
    for mod, w in zip(nt.weight_layers(net), clean):
        assert torch.equal(mod.weight, w)
    with pytest.raises(RuntimeError):
        with nt.perturbed(net, cfg, seed=3, run=2):
            raise RuntimeError("inside")
    for mod, w in zip(nt.weight_layers(net), clean):
        assert torch.equal(mod.weight, w), "not restored after an exception"


def test_noise_injection_gradient_at_the_noisy_weights_applied_to_the_clean_ones():
    net = small_net()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 10, (8,))
    cfg = nvcim.VariationConfig(sigma=0.4)
    ni = nt.NoiseInjection(cfg, seed=1)
    clean = [m.weight.detach().clone() for m in nt.weight_layers(net)]
    with ni.step(net):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    got = [m.weight.grad.clone() for m in nt.weight_layers(net)]
    for mod, w in zip(nt.weight_layers(net), clean):
        assert torch.equal(mod.weight, w)
    # The same gradient, computed by hand at step 0's noisy weights.
    ref = small_net()
    with torch.no_grad():
        for l, m in enumerate(nt.weight_layers(ref)):
            m.weight.copy_(torch.from_numpy(nvcim.perturb(clean[l].numpy(), cfg, 1, 0, l)))
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    for g, m in zip(got, nt.weight_layers(ref)):
        assert torch.allclose(g, m.weight.grad, rtol=1e-5, atol=1e-7)
    assert ni.steps == 1
    with pytest.raises(TypeError):
        nt.NoiseInjection({"sigma": 0.4})
    with pytest.raises(ValueError, match="no Conv"):
        with nt.perturbed(torch.nn.ReLU(), cfg, 0, 0):
            pass
