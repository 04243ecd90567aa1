"""The MNIST example (examples/mnist/): the tutorial reproduced, through dltrain and by hand.

Fast tests run the real loading code on small generated IDX files; tests
marked ``slow`` train on the real MNIST from ``$DLTRAIN_MNIST_DIR`` and are
skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from mnist_fakes import fake_images, write_fake_mnist, write_idx_labels

from dltrain.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "mnist"
EPOCH_LINE = re.compile(r"^Epoch (\d+): \[(\d+)/(\d+)\], Loss: (\d+\.\d{4})$")
ACCURACY_LINE = re.compile(r"^Accuracy of the network on the (\d+) test images: (\d+(\.\d+)?) %$")

# The scripts import their sibling modules (mnist_data, ...), as when run directly.
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))


def _load(script: str) -> ModuleType:
    """Import examples/mnist/<script>.py under a name that cannot clash with other tests."""
    name = f"mnist_example_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE_DIR / f"{script}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


train_script = _load("train")
plain_script = _load("plain_pytorch")
import mnist_data  # noqa: E402  (needs EXAMPLE_DIR on sys.path)
from mnist_model import Net  # noqa: E402


def _args(data_dir: Path, *options: str) -> argparse.Namespace:
    parser = train_script.build_parser("test")
    return parser.parse_args(["--data-dir", str(data_dir), "--device", "cpu", *options])


def _run_script(script: str, *options: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    path = EXAMPLE_DIR / f"{script}.py"
    return subprocess.run(
        [sys.executable, str(path.relative_to(cwd) if path.is_relative_to(cwd) else path), *options],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _check_lines(stdout: str, epochs: int, batches: int, test_images: int) -> tuple[list[float], float]:
    """The tutorial's lines, in order; return the losses and the accuracy they print."""
    lines = stdout.strip().splitlines()
    assert len(lines) == epochs + 1, stdout
    losses = []
    for epoch, line in enumerate(lines[:-1], 1):
        match = EPOCH_LINE.match(line)
        assert match, f"not the tutorial's epoch line: {line!r}"
        assert match.group(1, 2, 3) == (str(epoch), str(batches), str(batches))
        losses.append(float(match.group(4)))
    match = ACCURACY_LINE.match(lines[-1])
    assert match, f"not the tutorial's accuracy line: {lines[-1]!r}"
    assert int(match.group(1)) == test_images
    return losses, float(match.group(2))


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


def test_tutorial_net_is_linear_on_purpose() -> None:
    net = Net()
    a, b, zero = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        f0 = net(zero)
        assert torch.allclose(net(a + b) - f0, (net(a) - f0) + (net(b) - f0), atol=1e-5)
        assert net(a).shape == (1, 10)


def test_relu_net_is_not_linear_and_bad_activation_is_rejected() -> None:
    torch.manual_seed(0)
    net = Net("relu")
    a, b, zero = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        f0 = net(zero)
        assert not torch.allclose(net(a + b) - f0, (net(a) - f0) + (net(b) - f0), atol=1e-3)
    with pytest.raises(ValueError, match="'tanh'"):
        Net("tanh")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Loading: the real torchvision path on generated IDX files, and its errors
# ---------------------------------------------------------------------------


def test_fake_files_load_like_mnist(mnist_fake_dir: Path) -> None:
    train = mnist_data.load_mnist(mnist_fake_dir, train=True)
    image, label = train[0]
    assert len(train) == 600 and image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert isinstance(label, int) and 0 <= label < 10
    assert len(mnist_data.load_mnist(mnist_fake_dir, train=False)) == 100


def test_memory_loader_yields_what_totensor_gives(mnist_fake_dir: Path) -> None:
    loaders = mnist_data.make_loaders(mnist_fake_dir, loader="memory", batch_size=100, seed=0)
    dataset = mnist_data.load_mnist(mnist_fake_dir, train=False)
    images, labels = next(iter(loaders.test))  # not shuffled: the first 100 in order
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, torch.stack([dataset[i][0] for i in range(100)]))
    assert labels.tolist() == [dataset[i][1] for i in range(100)]
    assert (len(loaders.train), loaders.test_size) == (6, 100)


@pytest.mark.parametrize("loader", ["torchvision", "memory"])
def test_dltrain_learns_fake_mnist_well_above_chance(
    mnist_fake_dir: Path, loader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train_script.run(
        _args(mnist_fake_dir, "--epochs", "3", "--batch-size", "20", "--loader", loader)
    )
    losses, accuracy = _check_lines(capsys.readouterr().out, epochs=3, batches=30, test_images=100)
    assert accuracy == result["accuracy"] == 100 * result["correct"] / 100
    assert accuracy >= 50.0  # chance is 10 %
    assert losses == sorted(losses, reverse=True)
    assert result["history"]["train_loss"] == pytest.approx(losses, abs=1e-4)


@pytest.mark.parametrize("loader", ["torchvision", "memory"])
def test_dltrain_and_plain_loop_print_the_same_numbers_on_fake_mnist(
    mnist_fake_dir: Path, loader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(mnist_fake_dir, "--epochs", "2", "--batch-size", "20", "--loader", loader)
    plain = plain_script.run(args, echo=False)
    train_script.run(args)
    assert capsys.readouterr().out.strip().splitlines() == plain["lines"]


def test_missing_files_are_a_data_error_naming_them_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        mnist_data.make_loaders(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in ("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte", "--download"):
        assert name in message


def test_truncated_file_is_a_data_error(tmp_path: Path) -> None:
    root = write_fake_mnist(tmp_path, n_train=50, n_test=20)
    raw = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*--download"):
        mnist_data.load_mnist(root, train=True)


def test_label_count_mismatch_is_a_data_error(tmp_path: Path) -> None:
    root = write_fake_mnist(tmp_path, n_train=50, n_test=20)
    write_idx_labels(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", fake_images(19, 1)[1])
    with pytest.raises(DataError, match="20 images but 19 labels"):
        mnist_data.load_mnist(root, train=False)


def test_failed_download_is_a_data_error_not_a_urllib_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from torchvision.datasets import MNIST

    def offline(self: MNIST) -> None:
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/, got:\n"
            "<urlopen error [Errno -2] Name or service not known>"
        )

    monkeypatch.setattr(MNIST, "download", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError, match=r"downloading MNIST into .* failed: Error downloading") as info:
        mnist_data.make_loaders(tmp_path / "data", download=True)
    assert "network" in str(info.value)
    assert socket.getdefaulttimeout() == before


@pytest.mark.parametrize("script", ["train", "plain_pytorch"])
def test_script_without_data_exits_2_with_the_message(script: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = _run_script(script, "--data-dir", str(missing))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the MNIST data directory")
    for text in (str(missing), "does not exist", "MNIST/raw/train-images-idx3-ubyte", "--download"):
        assert text in result.stderr


@pytest.mark.parametrize(("script", "where"), [("train", "repo root"), ("plain_pytorch", "example dir")])
def test_script_runs_from_repo_root_and_from_its_directory(
    script: str, where: str, mnist_fake_dir: Path
) -> None:
    cwd = REPO_ROOT if where == "repo root" else EXAMPLE_DIR
    result = _run_script(
        script, "--data-dir", str(mnist_fake_dir), "--epochs", "2", "--batch-size", "20", cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    _check_lines(result.stdout, epochs=2, batches=30, test_images=100)


# ---------------------------------------------------------------------------
# Real MNIST (set DLTRAIN_MNIST_DIR; CI uses ../shared/data)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_tutorial_model_reaches_91_percent_through_dltrain(
    mnist_real_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train_script.run(_args(mnist_real_dir, "--loader", "memory"))  # 10 epochs
    losses, accuracy = _check_lines(capsys.readouterr().out, epochs=10, batches=600, test_images=10000)
    assert accuracy >= 91.0  # the tutorial's network is linear: ~91.7 %
    assert result["test_metrics"]["test_accuracy"] == pytest.approx(accuracy / 100)
    assert losses[-1] < 0.35 and losses == sorted(losses, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize(("loader", "epochs"), [("memory", 2), ("torchvision", 1)])
def test_train_and_plain_pytorch_print_the_same_lines_on_real_mnist(
    mnist_real_dir: Path, loader: str, epochs: int
) -> None:
    options = ("--data-dir", str(mnist_real_dir), "--loader", loader, "--epochs", str(epochs))
    options += ("--device", "cpu")
    dltrain_run = _run_script("train", *options)
    plain_run = _run_script("plain_pytorch", *options)
    assert dltrain_run.returncode == 0, dltrain_run.stderr
    assert plain_run.returncode == 0, plain_run.stderr
    assert dltrain_run.stdout == plain_run.stdout
    losses, accuracy = _check_lines(dltrain_run.stdout, epochs=epochs, batches=600, test_images=10000)
    assert 1.4 < losses[0] < 1.8  # the tutorial's first epoch: ~1.61
    assert accuracy > (85.0 if epochs == 2 else 75.0)  # ~86.8 % after 2 epochs, ~79.8 % after 1


def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(
    mnist_fake_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def train(*options: str) -> dict[str, object]:
        parser = train_script.build_train_parser()
        args = parser.parse_args(
            [
                "--data-dir",
                str(mnist_fake_dir),
                "--device",
                "cpu",
                "--batch-size",
                "20",
                "--loader",
                "memory",
                *list(options),
            ]
        )
        return train_script.run(args)

    straight = train("--epochs", "3")
    straight_lines = capsys.readouterr().out.splitlines()
    checkpoints = str(tmp_path / "ckpt")
    # A requeued job runs the same command every time: --resume auto starts fresh the first time.
    train("--epochs", "1", "--checkpoint-dir", checkpoints, "--resume", "auto")  # "interrupted"
    assert f"dltrain: no checkpoint in {checkpoints!r}: starting fresh" in capsys.readouterr().err
    resumed = train("--epochs", "3", "--checkpoint-dir", checkpoints, "--resume", "auto")
    captured = capsys.readouterr()
    assert (
        f"dltrain: resuming from {str(Path(checkpoints) / 'step-000000030.ckpt')!r} (step 30)" in captured.err
    )
    resumed_lines = captured.out.splitlines()
    assert resumed_lines == straight_lines[1:]  # epochs 2 and 3, and the accuracy line, the same
    assert resumed["accuracy"] == straight["accuracy"]
