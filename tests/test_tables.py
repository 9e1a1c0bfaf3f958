"""The committed paper tables are exactly what their own `Regenerate:` line makes of the committed runs.

Each results/tables/NAME.md names the `python -m ftjax.report ...` line that wrote it; running
that line again (into a temporary folder) must reproduce NAME.md and NAME.csv byte for byte, so
a table cannot drift from its sweep records (results/tables/runs/) or from the report code.
"""

import os
import pathlib
import re
import shlex

import pytest

from ftjax import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLES = ROOT / "results" / "tables"
MADE = sorted(p for p in TABLES.glob("*.md") if p.name != "README.md")


def _command(md: pathlib.Path) -> list[str]:
    m = re.search(r"^Regenerate: `python -m ftjax\.report (.+)`$", md.read_text(), re.M)
    assert m, f"{md.name}: no 'Regenerate: `python -m ftjax.report ...`' line"
    return shlex.split(m.group(1))


def test_tables_exist():
    assert MADE, "results/tables/ holds no table"


@pytest.mark.parametrize("md", MADE, ids=[p.stem for p in MADE])
def test_table_is_what_its_regenerate_line_writes(md, tmp_path, monkeypatch):
    argv = _command(md)
    o = report._parse(argv)
    assert o["out"] == f"results/tables/{md.stem}", f"{md.name} is written to {o['out']}"
    monkeypatch.chdir(ROOT)  # the roots in the command are relative to the repository root
    written = report.run(argv, out=str(tmp_path / md.stem))
    assert (tmp_path / f"{md.stem}.md").read_text() == md.read_text()
    assert (tmp_path / f"{md.stem}.csv").read_text() == (TABLES / f"{md.stem}.csv").read_text()
    for path in written:  # the plots are committed too (compared by name: their bytes follow matplotlib)
        assert (TABLES / os.path.basename(path)).is_file(), f"{os.path.basename(path)} is not committed"


def test_every_table_is_linked_from_the_readmes():
    index = (TABLES / "README.md").read_text()
    for md in MADE:
        assert f"({md.name})" in index, f"results/tables/README.md does not link {md.name}"
    assert "(results/tables/README.md)" in (ROOT / "README.md").read_text()
