"""The training-curve plot: panels only where there are points, one colour per run across panels."""
import json

from dcd.report import curve_panels, headroom_note, plot_training_curves


def _log(directory, records):
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curve_panels_keep_each_run_and_drop_empty_panels():
    logs = {
        "baseline": [{"step": 5, "loss": 2.0, "self": 2.0}, {"step": 10, "loss": 1.5, "self": 1.5}],
        "dcd": [{"step": 5, "loss": 3.0, "self": 4.0, "distill": 0.8}, {"step": 10, "loss": 2.0, "self": 3.0, "distill": 0.4}],
    }
    panels = curve_panels(logs)
    assert list(panels) == ["loss", "self", "distill"]  # no epoch ended: no validation panel
    assert list(panels["distill"]) == ["dcd"]  # the baseline has no distillation term
    assert panels["distill"]["dcd"] == [(5, 0.8), (10, 0.4)]
    assert panels["loss"]["baseline"] == [(5, 2.0), (10, 1.5)]
    logs["baseline"].append({"step": 10, "epoch": 1, "eval": {"rsum": 250.0}})
    assert curve_panels(logs)["val RSUM"] == {"baseline": [(1, 250.0)]}


def test_plot_is_written_and_skipped_without_logs(tmp_path):
    _log(tmp_path / "a", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    out = plot_training_curves({"a": tmp_path / "a", "missing": tmp_path / "b"}, tmp_path / "curves.png")
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curves({"missing": tmp_path / "b"}, tmp_path / "none.png") is None


def test_headroom_note_warns_only_when_the_teacher_does_not_out_rank_the_undistilled_dual():
    rows = [{"model": "teacher", "rsum": 218.2}, {"model": "baseline dual", "rsum": 339.7},
            {"model": "dcd dual", "rsum": 330.0}]
    note = headroom_note(rows)
    assert note.startswith("note: the teacher (RSUM 218.2)") and "(339.7)" in note
    assert headroom_note([{**rows[0], "rsum": 345.8}, *rows[1:]]) == ""
    assert headroom_note(rows[:1] + rows[2:]) == ""  # no undistilled dual trained: nothing to compare with
