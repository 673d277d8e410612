"""Checkpoint directories: complete or absent, the newest found, old ones pruned only after."""

import pytest

from rlhf_dist import checkpoint
from rlhf_dist.errors import ConfigError


def _save(root, step, keep_last=2):
    partial = checkpoint.begin(root, step)
    (partial / "driver.pt").write_bytes(b"state")
    final = checkpoint.commit(partial, step, {"what": "test"})
    checkpoint.prune(root, keep_last)
    return final


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    _save(tmp_path, 10)
    partial = checkpoint.begin(tmp_path, 20)  # killed while writing step 20
    (partial / "driver.pt").write_bytes(b"half")
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "step_00000010"
    with pytest.raises(ConfigError, match="not a complete checkpoint.*step_00000010"):
        checkpoint.resolve_resume(str(partial), tmp_path)
    _save(tmp_path, 30)  # the next save clears the partial one
    assert not partial.exists()


def test_keep_last_removes_old_ones_only_after_the_new_one_is_complete(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [20, 30]
    partial = checkpoint.begin(tmp_path, 40)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [20, 30]  # nothing gone yet
    checkpoint.commit(partial, 40, {})
    checkpoint.prune(tmp_path, 2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [30, 40]
    assert checkpoint.read_manifest(tmp_path / "step_00000040")["step"] == 40


def test_resume_values(tmp_path):
    assert checkpoint.resolve_resume(None, tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing saved yet: a fresh start
    with pytest.raises(ConfigError, match="no such directory"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)
    final = _save(tmp_path, 5)
    assert checkpoint.resolve_resume(str(final), tmp_path) == final
    again = _save(tmp_path, 5)  # the same step saved twice replaces it
    assert again == final and checkpoint.is_complete(final)
