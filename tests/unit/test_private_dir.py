"""Directories where we write what engines load: only ours, or refused (issue 21, item 9)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from weightsync.config import LoraSync
from weightsync.lora import adapter_dir, write_adapter
from weightsync.private_dir import private_dir

OTHER_UID = 65534  # nobody


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _as_root():
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")


def test_a_fresh_directory_and_its_missing_parents_are_created_0700(tmp_path):
    target = tmp_path / "a" / "b"
    assert private_dir(target) == target
    assert _mode(tmp_path / "a") == _mode(target) == 0o700
    assert os.lstat(target).st_uid == os.geteuid()


def test_an_existing_private_directory_is_accepted_as_it_is(tmp_path):
    (tmp_path / "d").mkdir(mode=0o755)
    os.chmod(tmp_path / "d", 0o755)  # readable by others is fine: they cannot change it
    assert private_dir(tmp_path / "d" / ".." / "d") == tmp_path / "d"
    assert _mode(tmp_path / "d") == 0o755


def test_a_directory_others_can_write_is_refused_naming_it(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ValueError, match=rf"{shared} has mode 0777.*chmod go-w"):
        private_dir(shared)
    with pytest.raises(ValueError, match=rf"{shared} has mode 0777.*not sticky"):
        private_dir(shared / "mine")  # as a parent too: our entry could be renamed
    assert list(shared.iterdir()) == []


def test_a_symlink_is_refused_even_to_a_private_directory(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'link'} is a symlink"):
        private_dir(tmp_path / "link")


def test_a_directory_of_another_user_is_refused(tmp_path):
    _as_root()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(ValueError, match=rf"{theirs} is owned by uid {OTHER_UID}, not by us"):
        private_dir(theirs)
    with pytest.raises(ValueError, match=rf"{theirs} is owned by uid {OTHER_UID} \(neither"):
        private_dir(theirs / "mine")  # its owner could rename our entry below it


def test_a_sticky_world_writable_parent_is_fine_but_not_another_users_entry_in_it(tmp_path):
    _as_root()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    assert _mode(private_dir(tmp / "ours" / "lora")) == 0o700
    (tmp / "planted").mkdir()
    os.chmod(tmp / "planted", 0o777)
    os.chown(tmp / "planted", OTHER_UID, OTHER_UID)
    with pytest.raises(ValueError, match=f"{tmp / 'planted'} is owned by uid {OTHER_UID}"):
        private_dir(tmp / "planted" / "lora")


def test_the_lora_write_refuses_a_root_others_can_write_before_writing_anything(tmp_path):
    root = tmp_path / "weightsync-lora"
    root.mkdir()
    os.chmod(root, 0o777)  # as another user's `mkdir -m 777 /dev/shm/weightsync-lora` left it
    lora = LoraSync(root=str(root))
    with pytest.raises(ValueError, match=rf"LoraSync.root: {root} has mode 0777"):
        adapter_dir(lora, "id")
    tensors = {"x.lora_A.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=rf"LoraSync.root: {root} has mode 0777"):
        write_adapter(lora.path("id", lora.served_name(1)), tensors, {"r": 2})
    assert list(root.iterdir()) == []


def test_the_lora_write_refuses_a_root_of_another_user(tmp_path):
    _as_root()
    root = tmp_path / "weightsync-lora"
    root.mkdir(mode=0o755)
    os.chown(root, OTHER_UID, OTHER_UID)
    lora = LoraSync(root=str(root))
    with pytest.raises(ValueError, match=rf"LoraSync.root: {root} is owned by uid {OTHER_UID}"):
        write_adapter(lora.path("id", lora.served_name(1)), {}, {"r": 2})
    assert list(root.iterdir()) == []


def test_a_missing_lora_root_is_created_private(tmp_path):
    lora = LoraSync(root=str(tmp_path / "shm" / "weightsync-lora"))
    assert adapter_dir(lora, "id") == tmp_path / "shm" / "weightsync-lora" / "id"
    path = lora.path("id", lora.served_name(1))
    write_adapter(path, {"x.lora_A.weight": torch.zeros(2, 2)}, {"r": 2})
    assert all(_mode(p) == 0o700 for p in (lora.root, path.parent))
    assert (path / "adapter_config.json").is_file()


def test_the_trainer_side_refuses_a_shared_lora_root_when_installed(tmp_path):
    """Before any pause or engine call: the source rank checks LoraSync.root as WeightSync
    installs its state (no collective there, so no other rank is left waiting)."""
    from types import SimpleNamespace

    from weightsync.config import SyncConfig
    from weightsync.worker import TrainerSync

    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    worker = SimpleNamespace(model_chunks=[], hf_config=None)
    config = SyncConfig(lora=LoraSync(root=str(root)))
    with pytest.raises(ValueError, match=f"LoraSync.root.*{root}"):
        TrainerSync.install(worker, "id", [], config, None)
    assert list(root.iterdir()) == []
