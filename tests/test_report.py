"""Test the HTML report of run directories, in files and in a real (headless Chromium) browser."""

import html
import json
import random
import re
import shutil
import sys

import pytest
import torch

import mixq
from mixq import cli
from mixq.report import browser, load_run, pareto_front, render
from mixq.report.runs import budget_label

PNG = b"\x89PNG\r\n\x1a\n"
RUNS = [  # (task, method, budget, method_args): two tasks, with and without sensitivity
    ("synthetic-mlp", "uniform", 5.0, None),
    ("synthetic-mlp", "sensitivity-ilp", 5.0, None),
    ("synthetic-cnn", "hawq", 5.0, {"hutchinson_samples": 2, "batches": 1}),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Three small run directories made by mixq.run, and their report."""
    root = tmp_path_factory.mktemp("report")
    dirs = []
    for task, method, budget, args in RUNS:
        d = root / f"{task}-{method}"
        mixq.run(
            task,
            method=method,
            candidates=["w2", "w4", "w8"],
            budget={"avg_weight_bits": budget},
            method_args=args,
            out=d,
        )
        dirs.append(d)
    page = render(dirs, root / "out")
    return dirs, page


def img_sources(page):
    return re.findall(r'<img src="([^"]+)"', page.read_text())


def test_report_links_every_plot(report):
    dirs, page = report
    assert page.name == "report.html"
    srcs = img_sources(page)
    # a Pareto plot per task, a bit-width chart per run, a heat map per run with a sensitivity
    assert sorted(srcs) == sorted(
        [
            "pareto-synthetic-mlp.png",
            "pareto-synthetic-cnn.png",
            "run00-bits.png",
            "run01-bits.png",
            "run02-bits.png",
            "run01-sensitivity.png",
            "run02-sensitivity.png",
        ]
    )
    for src in srcs:  # relative paths that resolve next to the page, each a PNG file
        assert (page.parent / src).read_bytes()[:8] == PNG
    has_sensitivity = [(d / "sensitivity.safetensors").exists() for d in dirs]
    assert has_sensitivity == [False, True, True]


def test_report_tables_hold_the_runs(report):
    dirs, page = report
    text = html.unescape(page.read_text())
    for d in dirs:
        m = json.loads((d / "metrics.json").read_text())
        row = re.search(
            rf"<td class=\"l\">{m['method']}</td><td class=\"l\">{budget_label(m)}</td>"
            rf"<td>([0-9.]+)</td>",
            text,
        )
        assert row is not None and float(row.group(1)) == pytest.approx(m["metric"], abs=1e-4)
        for line in (d / "layers.csv").read_text().splitlines()[1:]:  # every layer in its table
            layer, _, _, params, _, spec, _ = line.split(",")
            assert f'<td class="l">{layer}</td>' in text and f"<td>{spec}</td>" in text


def test_report_loads_in_chromium(report, tmp_path):
    _, page = report
    n = len(img_sources(page))
    shot = tmp_path / "shot.png"
    seen = browser.check(page, screenshot=shot, size=(1000, 800))
    assert (seen.loaded, seen.total) == (n, n)
    from matplotlib.image import imread

    pixels = imread(seen.screenshot)  # [H, W, channels] in [0, 1]
    assert pixels.shape[:2] == (800, 1000)
    rgb = pixels[..., :3]
    assert (rgb.mean(-1) < 0.9).mean() > 0.01  # text and plots, not a blank page
    assert rgb.std() > 0.05


def test_browser_check_counts_a_broken_image(report, tmp_path):
    _, page = report
    copy = tmp_path / "copy"
    shutil.copytree(page.parent, copy)
    (copy / "run00-bits.png").write_bytes(b"not a png")
    seen = browser.check(copy / "report.html")
    assert seen.total == len(img_sources(page)) and seen.loaded == seen.total - 1


def test_run_dir_without_metrics_is_rejected(report, tmp_path, capsys):
    dirs, _ = report
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"not-a-run.*no metrics\.json"):
        load_run(empty)
    assert cli.main(["report", str(dirs[0]), str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixq: error:") and "not-a-run" in err and "metrics.json" in err
    # a folder of run directories names them
    with pytest.raises(ValueError, match=re.escape(str(dirs[0]))):
        load_run(dirs[0].parent)
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "missing")


def test_malformed_metrics_name_the_missing_keys(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "t", "method": "m"}))
    with pytest.raises(ValueError, match=r"lacks \['metric', 'avg_weight_bits', 'size_bytes'\]"):
        load_run(tmp_path)
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_run(tmp_path)


def test_cli_report(report, tmp_path, capsys):
    dirs, _ = report
    out = tmp_path / "cli"
    assert cli.main(["report", str(dirs[0]), str(dirs[1]), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert len(img_sources(out / "report.html")) == 4  # one task: Pareto, 2 bit charts, 1 heat map


def test_report_without_matplotlib_says_what_to_install(report, tmp_path, monkeypatch):
    dirs, _ = report
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'mixq[report]'")):
        render(dirs[:1], tmp_path / "o")


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.randint(0, 6) * 1.0, rng.randint(0, 6) * 1.0) for _ in range(rng.randint(1, 9))]
        front = pareto_front(pts)
        dominated = [any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts) for p in pts]
        expected = [i for i, p in enumerate(pts) if not dominated[i] and pts.index(p) == i]
        assert sorted(front) == sorted(expected)
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_report_shows_each_chosen_score_with_its_standard_error(report):
    from mixq.sensitivity import Sensitivity

    dirs, page = report
    text = html.unescape(page.read_text())
    assert "sensitivity ± SE" in text
    sens = Sensitivity.load(dirs[1] / "sensitivity.safetensors")
    assert sens.se is not None and torch.isfinite(sens.se).all()
    for line in (dirs[1] / "layers.csv").read_text().splitlines()[1:]:
        layer, *_, spec, _ = line.split(",")
        shown = f"{sens.score(layer, spec):.3g} ± {sens.error(layer, spec):.2g}"
        assert f"<td>{shown}" in text
