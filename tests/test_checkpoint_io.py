"""Checkpoint files without a Trainer: writing, listing, retention, damage, unsafe files, compatibility."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dltrain import CheckpointError
from dltrain.checkpoint import (
    check_plain,
    compare_for_resume,
    inspect_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_for_resume,
    next_name,
    save_checkpoint,
    verify_checkpoint,
)
from dltrain.checkpoint.__main__ import main as cli
from dltrain.checkpoint._directory import STALE_AFTER_S, host_name
from dltrain.checkpoint._io import write_manifest


def payload(step: int, *, epoch: int = 0, value: float = 1.0) -> dict[str, Any]:
    """A payload shaped like ``trainer.state_dict()``."""
    return {
        "model": {"w": torch.full((3, 2), value), "b": torch.zeros(3)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "loop": {"epoch": epoch, "global_step": step, "batch_idx": 4, "micro_step": 0, "stage": "train"},
        "rng": {"torch": torch.get_rng_state(), "python": {"state": list(range(5))}},
        "plugins": {"metrics": {"count": 3}},
        "history": {"epochs": []},
        "config": {"accumulate_grad_batches": 1, "max_epochs": 2},
        "world_size": 1,
        "versions": {"dltrain": "0.1.0", "torch": str(torch.__version__)},
    }


def save(directory: Path, step: int, **kw: Any) -> Path:
    value = kw.pop("value", 1.0)
    return save_checkpoint(payload(step, value=value), directory, **kw).payload_path


# -- writing and reading --------------------------------------------------------------


def test_a_saved_checkpoint_loads_back_equal_and_its_manifest_describes_it(tmp_path: Path) -> None:
    info = save_checkpoint(
        payload(120, epoch=3), tmp_path / "ckpt", metrics={"val_loss": 0.5}, monitor="val_loss"
    )
    assert info.payload_path == tmp_path / "ckpt" / "step-000000120.ckpt"
    assert info.manifest_path.is_file()
    loaded = load_checkpoint(info.payload_path)
    assert torch.equal(loaded["model"]["w"], payload(120)["model"]["w"])
    assert loaded["loop"] == payload(120, epoch=3)["loop"]
    manifest = json.loads(info.manifest_path.read_text())
    assert manifest["global_step"] == 120 and manifest["epoch"] == 3
    assert manifest["payload_bytes"] == info.payload_path.stat().st_size
    assert manifest["score"] == 0.5 and manifest["versions"]["dltrain"] == "0.1.0"
    assert manifest["config"] == {"accumulate_grad_batches": 1, "max_epochs": 2}
    assert sorted(p.name for p in info.directory.iterdir()) == ["step-000000120.ckpt", "step-000000120.json"]


def test_the_newest_written_is_last_even_at_a_lower_step(tmp_path: Path) -> None:
    save(tmp_path, 500)
    save(tmp_path, 10)  # a new run into an old directory
    assert [i.global_step for i in list_checkpoints(tmp_path)] == [500, 10]
    _, path = load_for_resume("last", tmp_path)
    assert path.name == "step-000000010.ckpt"


def test_a_second_checkpoint_at_the_same_step_gets_its_own_name(tmp_path: Path) -> None:
    first, second = save(tmp_path, 7), save(tmp_path, 7)
    assert (first.name, second.name) == ("step-000000007.ckpt", "step-000000007-1.ckpt")
    assert next_name(tmp_path, 7) == "step-000000007-2"


def test_a_payload_that_is_not_plain_data_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    bad = payload(1)
    bad["plugins"]["early_stop"] = {"best": np.float64(0.3)}
    with pytest.raises(CheckpointError, match=r"payload\['plugins'\]\['early_stop'\]\['best'\] is a numpy"):
        save_checkpoint(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [object(), torch.__version__, {1.5j: 1}.keys(), lambda: 0])
def test_check_plain_names_what_torch_load_weights_only_would_refuse(value: Any) -> None:
    with pytest.raises(CheckpointError, match=r"payload\['x'\]"):
        check_plain({"x": value})


def test_check_plain_accepts_what_a_trainer_payload_holds() -> None:
    check_plain({**payload(1), "extra": (1, 2.0, "s", None, True, b"x", {3}, torch.Size([2]), torch.float16)})


# -- retention -------------------------------------------------------------------------


def test_keep_last_deletes_the_oldest_only_after_the_new_one_is_written(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep_last=2)
    assert [i.global_step for i in list_checkpoints(tmp_path)] == [3, 4]
    assert len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize(("mode", "best_step"), [("min", 2), ("max", 3)])
def test_keep_best_keeps_the_best_by_the_monitored_metric(tmp_path: Path, mode: str, best_step: int) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.4, 5: 0.3}
    for step, loss in losses.items():
        save(
            tmp_path,
            step,
            metrics={"val_loss": loss},
            monitor="val_loss",
            mode=mode,
            keep_last=1,
            keep_best=1,
        )
    assert sorted(i.global_step for i in list_checkpoints(tmp_path)) == sorted({best_step, 5})
    _, path = load_for_resume("best", tmp_path)
    assert path.name == f"step-{best_step:09d}.ckpt"


def test_a_superseded_checkpoint_at_the_same_step_is_replaced(tmp_path: Path) -> None:
    first = save(tmp_path, 8, keep_last=5)
    save(tmp_path, 8, keep_last=5, supersedes=first.stem)
    assert [i.name for i in list_checkpoints(tmp_path)] == ["step-000000008-1"]


def test_files_that_are_not_checkpoints_are_never_touched(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.ckpt").write_bytes(b"someone else's")
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.ckpt").read_bytes() == b"someone else's"


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next_save(tmp_path: Path) -> None:
    save(tmp_path, 1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a writer that has exited
    gone.wait()
    (tmp_path / f".tmp-step-000000002.ckpt~{host_name()}~{gone.pid}").write_bytes(b"half")
    orphan = tmp_path / "step-000000002.ckpt"
    orphan.write_bytes(b"payload without manifest")
    long_ago = time.time() - STALE_AFTER_S - 1  # no writer can be about to commit it
    os.utime(orphan, (long_ago, long_ago))
    assert [i.global_step for i in list_checkpoints(tmp_path)] == [1]
    save(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000001.ckpt",
        "step-000000001.json",
        "step-000000003.ckpt",
        "step-000000003.json",
    ]


# -- damage ----------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_manifest(path: Path) -> None:
    path.with_suffix(".json").unlink()


def flip_manifest(path: Path) -> None:
    manifest = path.with_suffix(".json")
    manifest.write_text(manifest.read_text().replace('"global_step": 2', '"global_step": 3'))


DAMAGE = {
    "truncated": (truncate, "is truncated"),
    "flipped byte": (flip_byte, "sha256 does not match"),
    "missing manifest": (drop_manifest, "incomplete|no manifest"),
    "edited manifest": (flip_manifest, "does not match its checksum"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_detected_and_named(tmp_path: Path, kind: str) -> None:
    path = save(tmp_path, 2)
    damage, message = DAMAGE[kind]
    damage(path)
    with pytest.raises(CheckpointError, match=message) as exc:
        verify_checkpoint(path)
    assert str(path.stem) in str(exc.value)
    with pytest.raises(CheckpointError, match=message):
        load_for_resume(path, None)  # an explicit path never falls back
    report = inspect_checkpoint(path)
    assert report["ok"] is False and report["problems"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_last_falls_back_to_the_newest_intact_checkpoint_with_a_warning(
    tmp_path: Path, kind: str
) -> None:
    save(tmp_path, 1, value=1.0)
    bad = save(tmp_path, 2, value=2.0)
    DAMAGE[kind][0](bad)
    with pytest.warns(UserWarning, match=bad.stem):
        loaded, path = load_for_resume("last", tmp_path)
    assert path.name == "step-000000001.ckpt"
    assert torch.equal(loaded["model"]["w"], torch.full((3, 2), 1.0))


def test_resume_last_says_what_is_wrong_when_no_checkpoint_is_intact(tmp_path: Path) -> None:
    flip_byte(save(tmp_path, 1))
    flip_byte(save(tmp_path, 2))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint") as exc:
        load_for_resume("last", tmp_path)
    assert "step-000000001" in str(exc.value) and "step-000000002" in str(exc.value)


def test_resume_without_a_directory_or_checkpoints_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpointing is off; set checkpoint=\{'dir'"):
        load_for_resume("last", None)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_resume("last", tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_for_resume("best", tmp_path)
    save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="none was saved with a monitored metric"):
        load_for_resume("best", tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_resume(tmp_path / "step-000000099.ckpt", None)


def test_a_directory_as_resume_means_its_last_checkpoint(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    assert load_for_resume(str(tmp_path), None)[1].name == "step-000000002.ckpt"


# -- unsafe files ------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command (what a hostile "checkpoint" does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant(directory: Path, marker: Path, *, legacy: bool) -> Path:
    """A hostile payload with a *valid* manifest, as an attacker who can write both would make."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "step-000000005.ckpt"
    obj = {"model": {}, "loop": {"global_step": 5}, "evil": Exploit(marker)}
    if legacy:
        target.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, target)
    from dltrain.checkpoint._io import FORMAT, FORMAT_VERSION, sha256_file

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": target.stem,
        "payload": target.name,
        "payload_sha256": sha256_file(target),
        "payload_bytes": target.stat().st_size,
        "serial": 1,
        "global_step": 5,
    }
    write_manifest(manifest, target.with_suffix(".json"), step=5)
    return target


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_file_crafted_to_run_code_is_refused_without_running_it(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    target = plant(tmp_path / "ckpt", marker, legacy=legacy)
    assert verify_checkpoint(target).global_step == 5  # the checksum alone does not make it safe
    with pytest.raises(CheckpointError, match="refused to load"):
        load_for_resume(target, None)
    with pytest.warns(UserWarning, match="refused"), pytest.raises(CheckpointError):
        load_for_resume("last", tmp_path / "ckpt")
    report = inspect_checkpoint(target)
    assert report["ok"] is False and "refused" in report["problems"][0]
    assert not marker.exists()


# -- compatibility -----------------------------------------------------------------------


def test_compare_for_resume_lists_every_difference_that_changes_the_computation() -> None:
    saved = payload(10)
    saved["batch_size"] = 32
    current = {
        "config": {"accumulate_grad_batches": 4, "max_epochs": 50},
        "model": {"w": (3, 5), "extra": (1,)},
        "world_size": 2,
        "batch_size": 64,
    }
    diffs = compare_for_resume(saved, current)
    text = "\n".join(diffs)
    assert "accumulate_grad_batches: 1 in the checkpoint, 4 now" in text
    assert "world_size: 1 in the checkpoint, 2 now" in text
    assert "batch_size: 32 in the checkpoint, 64 now" in text
    assert "'w': shape [3, 2] in the checkpoint, [3, 5] now" in text
    assert "lacks: 'b'" in text and "checkpoint lacks: 'extra'" in text
    assert "max_epochs" not in text  # extending a run is what resuming is for
    assert len(diffs) == 6


def test_compare_for_resume_is_empty_for_the_same_run() -> None:
    saved = payload(10)
    current = {"config": saved["config"], "model": {k: tuple(v.shape) for k, v in saved["model"].items()}}
    assert compare_for_resume(saved, {**current, "world_size": 1}) == []


# -- command line ------------------------------------------------------------------------


def test_inspect_prints_what_a_checkpoint_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = save(tmp_path, 42, metrics={"val_loss": 0.25}, monitor="val_loss")
    assert cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    for text in ("status      OK", "global step 42", "val_loss=0.25", "torch", "accumulate_grad_batches"):
        assert text in out
    assert cli(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 42
    assert cli(["list", str(tmp_path)]) == 0
    assert "[last, best]" in capsys.readouterr().out


def test_inspect_exits_non_zero_on_a_damaged_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    path = save(tmp_path, 3)
    flip_byte(path)
    result = subprocess.run(
        [sys.executable, "-m", "dltrain.checkpoint", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "DAMAGED" in result.stdout and "sha256 does not match" in result.stdout
