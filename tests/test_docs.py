"""The README fits one screen and opens with the two commands; every generated table matches its results file."""
import re
from pathlib import Path

from dcd import docs

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_opens_with_the_two_commands_and_fits_a_screen():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150
    assert lines[2] == "```bash" and lines[3].startswith("make distill TEACHER=meter") and lines[4].startswith("make test")


def test_every_generated_table_is_current():
    for page in docs.PAGES:
        text = (ROOT / page).read_text()
        assert docs.refresh(text) == text, f"{page}: run make docs"
    assert docs.main(["--check"]) == 0


def test_a_stale_table_is_found(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: headline -->\n| made up | 999 |\n<!-- end: headline -->\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "PAGES", ("page.md",))
    assert docs.main(["--check"]) == 1 and "999" in page.read_text()
    assert docs.main([]) == 0 and "999" not in page.read_text() and "paired by seed" in page.read_text()


def test_the_pages_the_readme_links_to_exist():
    for link in re.findall(r"\]\(([^)#]+)", (ROOT / "README.md").read_text()):
        if not link.startswith("http"):
            assert (ROOT / link).is_file(), link


def test_the_meter_tables_read_meter_records_only(tmp_path, monkeypatch):
    """A ViLT sweep writes into the same compression.json: the METER headline must still show METER's teacher."""
    import json

    def record(teacher, method, seed, rsum):
        return {"teacher": teacher, "student": "dual" if method != "teacher" else "teacher", "method": method,
                "seed": seed, "params": 1e6, "test_rsum": rsum}

    meter = [record("meter", "teacher", None, 345.0)] + [
        record("meter", m, s, base + s) for s in range(3) for m, base in (("baseline_t2i", 330), ("dcd_denoised_t2i", 360))]
    vilt = [record("vilt", "teacher", None, 111.0), record("vilt", "baseline_t2i", 0, 1.0),
            record("vilt", "dcd_denoised_t2i", 0, 2.0)]
    # a fusion row may carry a dual row's method name (the fusion student's two-direction recipe): not the dual's
    fusion = [{**record("meter", m, 0, 999.0), "student": "fusion"} for m in ("baseline_t2i", "dcd_denoised_t2i")]
    (tmp_path / "compression.json").write_text(json.dumps({"records": meter + vilt + fusion}))
    monkeypatch.setattr(docs, "RESULTS", tmp_path)
    headline = docs.GENERATORS["headline"]()
    assert "345.0" in headline and "111.0" not in headline and "+30.0 RSUM" in headline and "999" not in headline
    assert "999" not in docs.GENERATORS["parts"]()
