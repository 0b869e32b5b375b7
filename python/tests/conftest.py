"""Shared fixtures: the repository, the `nvcim` binary of the same build as the wheel, the data."""

import json
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "models" / "vgg8-w0.25-fmnist-nft.onnx"
DATA = pathlib.Path(os.environ.get("NVCIM_FMNIST", "/usr/share/datasets/fashion-mnist"))


def nvcim_bin() -> pathlib.Path:
    env = os.environ.get("NVCIM_BIN")
    if env:
        return pathlib.Path(env)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "nvcim"


def run_nvcim(*args) -> str:
    """Runs the CLI; fails the test with its stderr when it fails."""
    exe = nvcim_bin()
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: build it (cargo build --release) or set NVCIM_BIN")
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"nvcim {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p.stdout


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not (DATA / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"no Fashion-MNIST in {DATA}: run `cargo xtask setup` or set NVCIM_FMNIST")
    return DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> pathlib.Path:
    """A tiny VGG-8 (width 0.125) trained for one epoch on 96 images: real weights of nvcim's
    float path, to export clean and as noisy instances."""
    out = tmp_path_factory.mktemp("train") / "run"
    run_nvcim("train", "--dataset", "fashion-mnist", "--data-dir", data_dir, "--model", "vgg8",
              "--width", "0.125", "--method", "vanilla", "--epochs", "1", "--max-train", "96",
              "--batch-size", "32", "--mc-val", "1", "--out", out, "--quiet")
    return out


def read_json(path: pathlib.Path):
    with open(path) as f:
        return json.load(f)
