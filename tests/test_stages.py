"""Content-addressed stage folders: nothing a run made is deleted, and two processes share one stage."""
import json
import multiprocessing
import time

import pytest

from dcd.stages import (StageConflict, claim_stage, fingerprint, find_stages, read_latest, stage_dir, stage_lock,
                        write_latest)


def test_a_changed_setting_makes_a_new_folder_and_keeps_the_old(tmp_path):
    first, second = {"alpha": 0.2, "directions": ("i2t",)}, {"alpha": 0.5, "directions": ("i2t",)}
    a, b = stage_dir(tmp_path, "dual-dcd-seed0", first), stage_dir(tmp_path, "dual-dcd-seed0", second)
    assert a != b and a.name.startswith("dual-dcd-seed0-") and len(a.name.split("-")[-1]) == 8
    assert claim_stage(a, first, "student") is False  # nothing there yet
    (a / "checkpoint.pt").write_text("half-trained")
    assert claim_stage(a, first, "student") is True  # same identity: resume
    assert claim_stage(b, second, "student") is False
    assert (a / "checkpoint.pt").read_text() == "half-trained"  # the other stage is untouched
    assert find_stages(tmp_path) == sorted([a, b])
    stored = json.loads((a / "stage.json").read_text())
    assert stored["identity"] == {"alpha": 0.2, "directions": ["i2t"]} and stored["fingerprint"] == fingerprint(first)


def test_a_folder_holding_another_identity_is_refused_not_cleared(tmp_path):
    a = stage_dir(tmp_path, "s", {"x": 1})
    claim_stage(a, {"x": 1}, "student")
    (a / "weights").write_text("w")
    with pytest.raises(StageConflict, match="left as it is"):
        claim_stage(a, {"x": 2}, "student")
    assert (a / "weights").is_file()


def test_latest_names_the_stages_of_the_last_run(tmp_path):
    a = stage_dir(tmp_path / "students", "dual-dcd-seed0", {"x": 1})
    write_latest(tmp_path, {"dcd": a})
    assert read_latest(tmp_path) == {"dcd": a}
    assert json.loads((tmp_path / "latest.json").read_text())["stages"]["dcd"] == f"students/{a.name}"


def _hold(directory, seconds, started):
    with stage_lock(directory):
        started.set()
        (directory.parent / "order.txt").open("a").write("first-in\n")
        time.sleep(seconds)
        (directory.parent / "order.txt").open("a").write("first-out\n")


def test_a_second_process_waits_for_the_stage_the_first_holds(tmp_path):
    directory = tmp_path / "stage-1234abcd"
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    holder = ctx.Process(target=_hold, args=(directory, 1.5, started))
    holder.start()
    assert started.wait(20)
    t0 = time.monotonic()
    with stage_lock(directory, poll=0.05):
        waited = time.monotonic() - t0
        (tmp_path / "order.txt").open("a").write("second-in\n")
    holder.join(20)
    assert (tmp_path / "order.txt").read_text().split() == ["first-in", "first-out", "second-in"]
    assert waited > 0.5


def test_prune_keeps_what_the_last_run_named_and_what_a_process_holds(tmp_path):
    from dcd.runs import prune

    kept, old, busy = (stage_dir(tmp_path / "students", f"dual-dcd-seed{i}", {"x": i}) for i in range(3))
    for path, identity in ((kept, {"x": 0}), (old, {"x": 1}), (busy, {"x": 2})):
        claim_stage(path, identity, "student")
    write_latest(tmp_path, {"dcd": kept})
    with stage_lock(busy):  # another process is writing it
        assert prune(tmp_path, dry_run=True) == [old]
        assert prune(tmp_path) == [old]
    assert kept.is_dir() and busy.is_dir() and not old.exists()
