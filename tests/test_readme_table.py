"""scripts/readme_table.py: README's Results table is what the committed evaluate JSONs say."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import readme_table  # noqa: E402


def test_the_readme_results_table_matches_the_committed_jsons():
    assert readme_table.main(["--check", str(ROOT / "README.md")]) == 0


def write(tmp_path, name, **values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values))
    return path


def test_cells_mean_sd_range_and_bold_by_unrounded_value(tmp_path):
    a0, a1 = write(tmp_path, "a0", fid=8.0, classifier_recall=0.880), write(tmp_path, "a1", fid=9.0,
                                                                               classifier_recall=0.890)
    # a preset: seed means 6.0 and 7.0 (fid), recall 0.8801 vs the model's 0.885: the model is best
    seeds = [[write(tmp_path, f"s{s}k{k}", fid=6.0 + s + k * 0.5 - 0.25, classifier_recall=0.8801) for k in (0, 1)]
             for s in (0, 1)]
    table = readme_table.make_table(columns=[("model", [[a0, a1]]), ("preset", seeds)],
                                    rows=[("FID", ["fid"]), ("recall", ["classifier_recall"])])
    lines = table.splitlines()
    assert lines[0] == "| measure | model | preset |"
    assert lines[2] == "| FID | 8.50 (8.00-9.00) | **6.50** +- 0.71 |"
    assert lines[3] == "| recall | **0.885** (0.880-0.890) | 0.880 +- 0.000 |"


def test_a_range_of_0_003_or_less_as_printed_is_left_out(tmp_path):
    a0, a1 = write(tmp_path, "a0", alignment=0.9444), write(tmp_path, "a1", alignment=0.9476)   # 0.944-0.948
    b0, b1 = write(tmp_path, "b0", alignment=0.9441), write(tmp_path, "b1", alignment=0.9467)   # 0.944-0.947 (0.003)
    table = readme_table.make_table(columns=[("a", [[a0, a1]]), ("b", [[b0, b1]])], rows=[("align", ["alignment"])])
    assert table.splitlines()[2] == "| align | **0.946** (0.944-0.948) | 0.945 |"


def test_density_is_best_nearest_one(tmp_path):
    a, b = write(tmp_path, "a", classifier_density=1.05), write(tmp_path, "b", classifier_density=0.9)
    table = readme_table.make_table(columns=[("a", [[a]]), ("b", [[b]])], rows=[("density", ["classifier_density"])])
    assert table.splitlines()[2] == "| density | **1.050** | 0.900 |"


def test_check_names_the_row_that_drifted(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    table = readme_table.make_table()
    row = next(line for line in table.splitlines() if line.startswith("| alignment | 0."))
    drifted = row.replace("| alignment | 0.", "| alignment | 9.", 1)   # the teacher's alignment, whatever it is
    readme.write_text("# x\n\n" + table.replace(row, drifted) + "\n\nmore\n")
    assert readme_table.main(["--check", str(readme)]) == 1
    out = capsys.readouterr().out
    assert "differs" in out and "| alignment | 9." in out and out.count("README:") == 1


def test_check_without_a_table_or_file_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no table here\n")
    with pytest.raises(SystemExit, match="no Results table"):
        readme_table.main(["--check", str(readme)])
    with pytest.raises(SystemExit):
        readme_table.main(["--check", str(tmp_path / "missing.md")])


def test_a_missing_json_is_named(tmp_path):
    with pytest.raises(SystemExit, match="nope.json"):
        readme_table.make_table(columns=[("a", [[tmp_path / "nope.json"]])], rows=[("FID", ["fid"])])
