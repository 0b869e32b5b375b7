"""The wheel against the `nvcim` CLI of the same build: bit-identical weights, identical per-run
Monte Carlo counts, and clear Python exceptions for bad arguments."""

import pickle
import threading

import numpy as np
import pytest

import nvcim
from conftest import REFERENCE, read_json, run_nvcim

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


def canonical_weight_layers(path):
    """The weight layers of an ONNX file in nvcim's layer order and canonical [out][in]...
    order (Conv as stored; Gemm with transB=0 and MatMul stored [in][out], transposed)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b):
            w = w.T
        layers.append(np.ascontiguousarray(w, dtype=np.float32))
    return layers


@pytest.mark.parametrize("seed,run,layer", [(0, 0, 0), (7, 3, 3), (2**40 + 1, 199, -1)])
def test_perturb_equals_the_float_engine_bit_for_bit(tmp_path, trained_run, seed, run, layer):
    clean_path, noisy_path = tmp_path / "clean.onnx", tmp_path / "noisy.onnx"
    run_nvcim("export", trained_run, "-o", clean_path)
    run_nvcim("export", trained_run, "-o", noisy_path, "--noisy-instance", "--sigma", "0.4",
              "--seed", seed, "--run", run)
    clean, noisy = canonical_weight_layers(clean_path), canonical_weight_layers(noisy_path)
    assert len(clean) == len(noisy) == 8  # VGG-8's backbone: 6 conv + 2 linear layers
    layer %= len(clean)
    cfg = nvcim.VariationConfig(sigma=0.4)
    ours = nvcim.perturb(clean[layer], cfg, seed, run, layer)
    assert ours.dtype == np.float32 and ours.shape == clean[layer].shape
    assert not np.array_equal(ours, clean[layer]), "sigma 0.4 changed no weight"
    # Bit for bit, NaN-free: compare the raw bits.
    assert np.array_equal(ours.view(np.uint32), noisy[layer].view(np.uint32)), (
        f"layer {layer}: {np.count_nonzero(ours != noisy[layer])} of {ours.size} weights differ"
    )
    # Another layer index is another stream.
    other = nvcim.perturb(clean[layer], cfg, seed, run, layer + 1)
    assert not np.array_equal(other, ours)


def test_perturb_threads_give_the_same_bits():
    # Large enough to be split (131,072 weights or more); the pieces cross blocks of draws.
    w = (np.random.default_rng(4).standard_normal((3, 65_536 + 7)) * 0.05).astype(np.float32)
    cfg = nvcim.VariationConfig(sigma=0.4)
    one = nvcim.perturb(w, cfg, 9, 2, 1, threads=1)
    for threads in (None, 2, 3, 64):
        got = nvcim.perturb(w, cfg, 9, 2, 1, threads=threads)
        assert np.array_equal(got.view(np.uint32), one.view(np.uint32)), f"threads={threads}"
    with pytest.raises(ValueError, match="threads=0"):
        nvcim.perturb(w, cfg, 9, 2, 1, threads=0)
    with pytest.raises(TypeError, match="threads"):
        nvcim.perturb(w, cfg, 9, 2, 1, threads=1.5)


def test_perturb_reads_any_layout_and_keeps_the_input():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 16, 3, 3), dtype=np.float32)
    keep = w.copy()
    cfg = nvcim.VariationConfig(sigma=0.3)
    a = nvcim.perturb(w, cfg, 5, 1, 2)
    assert np.array_equal(w, keep), "perturb wrote into its input"
    fortran = np.asfortranarray(w)
    assert np.array_equal(nvcim.perturb(fortran, cfg, 5, 1, 2), a), "C order is the contract"
    strided = np.zeros((32, 16, 3, 6), dtype=np.float32)
    strided[..., ::2] = w
    assert np.array_equal(nvcim.perturb(strided[..., ::2], cfg, 5, 1, 2), a)
    assert np.array_equal(nvcim.perturb(w, cfg, 5, 1, 2), a), "not a function of its arguments"
    assert np.array_equal(nvcim.perturb(w, cfg.with_sigma(0.0), 5, 1, 2),
                          nvcim.perturb(w, nvcim.VariationConfig(sigma=0.0), 5, 1, 2))


def test_perturb_has_the_closed_form_std():
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, size=400_000).astype(np.float32)
    w[0] = 1.0
    for sigma in (0.1, 0.4):
        cfg = nvcim.VariationConfig(sigma=sigma)
        err = nvcim.perturb(w, cfg, 3, 0, 0) - w
        expect = cfg.weight_std(1.0)
        # sigma / sqrt(2n) relative standard error of a sample std; 5 of them.
        assert abs(np.std(err) / expect - 1) < 5 / np.sqrt(2 * w.size), (np.std(err), expect)
        assert abs(np.mean(err)) < 5 * expect / np.sqrt(w.size)
    # M = 8, N = 2, range: 0.7776 sigma of max|W| (README, `nvcim variation`).
    assert nvcim.VariationConfig(sigma=1.0).weight_std(1.0) == pytest.approx(0.7776, abs=1e-4)


def test_variation_config_fields_repr_and_pickle():
    cfg = nvcim.VariationConfig(m=8, n=4, sigma=0.25, unit="level", stuck_low=0.01)
    assert (cfg.m, cfg.n, cfg.unit, cfg.profile, cfg.devices_per_weight) == (8, 4, "level",
                                                                            "uniform", 2)
    assert cfg.sigma == pytest.approx(0.25) and cfg.stuck_low == pytest.approx(0.01)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert "n=4" in repr(cfg) and "unit='level'" in repr(cfg)
    assert cfg.with_sigma(0.5).sigma == pytest.approx(0.5)


def test_evaluate_onnx_equals_the_cli(tmp_path, data_dir):
    out = tmp_path / "eval"
    run_nvcim("eval", "--onnx", REFERENCE, "--data-dir", data_dir, "--sigma", "0.2,0.6",
              "--mc", "4", "--seed", "11", "--test-subset", "300", "--out", out, "--quiet")
    cli = read_json(out / "eval.json")
    images, labels = nvcim.onnx_dataset(REFERENCE, data_dir, limit=300)
    assert images.shape == (300, 1, 32, 32) and images.dtype == np.float32
    assert labels.shape == (300,) and labels.dtype == np.int64
    py = nvcim.evaluate_onnx(REFERENCE, images, labels, sigmas=[0.2, 0.6], mc=4, seed=11, jobs=2)
    assert py["clean_accuracy"] == cli["clean_accuracy"]
    assert len(py["results"]) == len(cli["results"]) == 2
    for a, b in zip(py["results"], cli["results"]):
        assert a["sigma"] == b["sigma"]
        assert a["correct"] == b["correct"], (a["sigma"], a["correct"], b["correct"])
        assert a["accuracies"] == b["accuracies"] and a["summary"] == b["summary"]
    # Accuracy falls with sigma on the reference model (the numbers mean something).
    means = [r["summary"]["mean"] for r in py["results"]]
    assert means[1] < means[0] <= py["clean_accuracy"] + 2, means
    # jobs never changes a number; one thread gives the same runs.
    one = nvcim.evaluate_onnx(REFERENCE, images, labels, sigmas=0.6, mc=4, seed=11, jobs=1)
    assert one["results"][0]["correct"] == py["results"][1]["correct"]


def test_evaluate_onnx_releases_the_gil(data_dir):
    images, labels = nvcim.onnx_dataset(REFERENCE, data_dir, limit=200)
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.005)

    t = threading.Thread(target=tick)
    t.start()
    try:
        nvcim.evaluate_onnx(REFERENCE, images, labels, sigmas=[0.4], mc=6, seed=0, jobs=1)
    finally:
        stop.set()
        t.join()
    assert len(ticks) > 5, "another Python thread did not run while evaluate_onnx ran"


@pytest.mark.parametrize("kwargs,text", [
    (dict(sigma=-0.1), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(m=8, n=3), "n=3"),
    (dict(m=0), "m=0"),
    (dict(unit="volts"), "unit"),
    (dict(profile="bimodal?"), "profile"),
    (dict(stuck_low=0.7, stuck_high=0.6), "stuck"),
])
def test_bad_variation_config_raises_value_error(kwargs, text):
    with pytest.raises(ValueError, match=text):
        nvcim.VariationConfig(**kwargs)


def test_bad_perturb_arguments():
    cfg = nvcim.VariationConfig()
    with pytest.raises(TypeError, match="float32"):
        nvcim.perturb(np.ones(8, dtype=np.float64), cfg, 0, 0, 0)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        nvcim.perturb([1.0, 2.0], cfg, 0, 0, 0)
    with pytest.raises(TypeError, match="VariationConfig"):
        nvcim.perturb(np.ones(8, dtype=np.float32), {"sigma": 0.4}, 0, 0, 0)
    with pytest.raises(ValueError, match="run=-1"):
        nvcim.perturb(np.ones(8, dtype=np.float32), cfg, 0, -1, 0)
    with pytest.raises(ValueError, match="empty"):
        nvcim.perturb(np.ones(0, dtype=np.float32), cfg, 0, 0, 0)
    bad = np.ones(8, dtype=np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="weights"):
        nvcim.perturb(bad, cfg, 0, 0, 0)
    with pytest.raises(ValueError, match="max_abs"):
        cfg.weight_std(-1.0)


def test_bad_evaluate_arguments(tmp_path, data_dir):
    images, labels = nvcim.onnx_dataset(REFERENCE, data_dir, limit=8)
    ev = nvcim.evaluate_onnx
    with pytest.raises(ValueError, match="4-D"):
        ev(REFERENCE, images.reshape(-1), labels, [0.4], 2, 0)
    with pytest.raises(ValueError, match="4-D"):
        ev(REFERENCE, images[0], labels, [0.4], 2, 0)
    with pytest.raises(TypeError, match="float32"):
        ev(REFERENCE, images.astype(np.float64), labels, [0.4], 2, 0)
    with pytest.raises(ValueError, match="labels"):
        ev(REFERENCE, images, labels[:5], [0.4], 2, 0)
    with pytest.raises(ValueError, match="1-D"):
        ev(REFERENCE, images, labels.reshape(2, 4), [0.4], 2, 0)
    with pytest.raises(ValueError, match="sigma"):
        ev(REFERENCE, images, labels, [-0.2], 2, 0)
    with pytest.raises(ValueError, match="mc"):
        ev(REFERENCE, images, labels, [0.4], 0, 0)
    with pytest.raises(ValueError, match="jobs"):
        ev(REFERENCE, images, labels, [0.4], 2, 0, jobs=0)
    with pytest.raises(RuntimeError, match="shape"):
        ev(REFERENCE, images[:, :, :28, :28].copy(), labels, [0.4], 2, 0)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        ev(tmp_path / "nope.onnx", images, labels, [0.4], 2, 0)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(REFERENCE.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="broken.onnx"):
        ev(broken, images, labels, [0.4], 2, 0)
    with pytest.raises(ValueError, match="split"):
        nvcim.onnx_dataset(REFERENCE, data_dir, split="val")
    with pytest.raises(RuntimeError):
        nvcim.onnx_dataset(REFERENCE, tmp_path, limit=4)
