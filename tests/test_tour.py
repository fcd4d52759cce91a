"""The tour (docs/tour.py): its notebook and its markdown page are what jupytext makes of it,
and it runs end to end, writing every figure its text shows."""
import os
import re
import subprocess
import sys

import jupytext
import pytest
from PIL import Image

from conftest import ROOT

DOCS = ROOT / "docs"
TOUR = DOCS / "tour.py"


def _cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def markdown_page(path=TOUR) -> str:
    """docs/TOUR.md as jupytext writes the tour: its text, the figures it links, its code."""
    notebook = jupytext.read(path)
    notebook.metadata["jupytext"] = {"notebook_metadata_filter": "-all",
                                     "cell_metadata_filter": "-all"}
    return jupytext.writes(notebook, fmt="md")


def test_the_notebook_and_the_page_are_the_tour():
    # regenerate with: jupytext --to ipynb docs/tour.py, and markdown_page() into docs/TOUR.md
    assert _cells(jupytext.read(DOCS / "tour.ipynb")) == _cells(jupytext.read(TOUR))
    assert (DOCS / "TOUR.md").read_text() == markdown_page()


def _figures_linked() -> list:
    return re.findall(r"!\[[^\]]*\]\(tour/([a-z_]+\.png)\)", TOUR.read_text())


def test_the_tour_links_fifteen_figures_and_ships_them():
    names = _figures_linked()
    assert len(names) == len(set(names)) == 15
    for name in names:
        assert Image.open(DOCS / "tour" / name).size[0] > 200, name


def test_the_tour_runs_and_writes_every_figure(tmp_path):
    env = dict(os.environ, DIFFUSION101_TOUR_QUICK="1", DIFFUSION101_TOUR_OUT=str(tmp_path),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(TOUR)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with one token, every weight is [1.0]" in proc.stdout
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(_figures_linked())
    for name in written:
        width, height = Image.open(tmp_path / name).size
        assert width > 200 and height > 100, name
