"""``moeprobe report --html/--png/--svg`` and ``moeprobe simulate --html`` in a subprocess: the files, their
content read back (PNG pixels with Pillow), and one-line errors. The browser check is test_html_browser.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import chart_traces
from tests.conftest import PYTHON, run_cli_env

pytest.importorskip("vl_convert")
Image = pytest.importorskip("PIL.Image")

CHARTS = {"heatmap", "maxvio", "tag-domain", "coactivation", "latency"}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "moeprobe", *args], capture_output=True, text=True, env=run_cli_env(),
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("html")
    return chart_traces.build(root / "skewed", skew=4.0), chart_traces.build(root / "flat", skew=0.0, seed=1)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def test_html_report_is_one_offline_file(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = _cli("report", str(traces[0]), "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the pictures replace the text tables
    assert result.stderr.strip() == f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB)"
    html = out.read_text(encoding="utf-8")
    assert "default-src 'none'" in html  # the page may not fetch anything; the browser test checks it does not
    assert "<script src" not in html and "<link" not in html
    assert "window.vegaEmbed=" in html  # the renderer itself is inline
    for name in CHARTS:
        assert f'id="chart-{name}"' in html
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left beside it


def test_json_and_html_from_one_run(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    result = _cli("report", str(traces[0]), "--json", "--html", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "counts" in report["specialization"]["tags"][0]["layers"][0]  # the pictures need --full's tables
    assert out.exists()


def test_png_and_svg_figures(traces: tuple[Path, Path], tmp_path: Path) -> None:
    result = _cli("report", str(traces[0]), "--png", str(tmp_path / "png"), "--svg", str(tmp_path / "svg"))
    assert result.returncode == 0, result.stderr
    assert {p.stem for p in (tmp_path / "png").iterdir()} == CHARTS
    assert {p.stem for p in (tmp_path / "svg").iterdir()} == CHARTS
    for name in CHARTS:
        pixels = _pixels(tmp_path / "png" / f"{name}.png")
        height, width, _ = pixels.shape
        assert width >= 300 and height >= 150, (name, width, height)
        assert pixels.std() > 10, name  # not a blank (or one-colour) image
        assert (pixels.min(axis=2) < 128).mean() > 0.005, name  # some dark ink: axes and labels
        svg = (tmp_path / "svg" / f"{name}.svg").read_text(encoding="utf-8")
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    heat_svg = (tmp_path / "svg" / "heatmap.svg").read_text(encoding="utf-8")
    # Vega labels every mark it draws: one label per (layer, expert) cell
    assert heat_svg.count('aria-label="expert: ') == chart_traces.LAYERS * chart_traces.EXPERTS


def _heat_colour(trace: Path, out: Path) -> tuple[float, float]:
    """(spread of the colour of every pixel, share of strongly coloured pixels) of the heat map PNG."""
    result = _cli("report", str(trace), "--png", str(out))
    assert result.returncode == 0, result.stderr
    pixels = _pixels(out / "heatmap.png")
    chroma = pixels.max(axis=2) - pixels.min(axis=2)  # 0 for white, grey and black; high for red and blue
    return float(chroma.std()), float((chroma > 40).mean())


def test_skewed_and_flat_heat_maps_differ(traces: tuple[Path, Path], tmp_path: Path) -> None:
    skewed_spread, skewed_coloured = _heat_colour(traces[0], tmp_path / "a")
    flat_spread, flat_coloured = _heat_colour(traces[1], tmp_path / "b")
    # the colour scale spans at least 0..2 x fair share, so near-fair cells stay pale instead of being stretched
    assert skewed_coloured > 2 * flat_coloured, (skewed_coloured, flat_coloured)
    assert skewed_spread > flat_spread, (skewed_spread, flat_spread)


def test_compare_html_and_pngs(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp.html"
    result = _cli("report", str(traces[0]), str(traces[1]), "--compare", "--html", str(out), "--png", str(tmp_path / "p"))
    assert result.returncode == 0, result.stderr
    html = out.read_text(encoding="utf-8")
    assert "differences (b - a)" in html
    for name in CHARTS:
        assert f'id="chart-a-{name}"' in html and f'id="chart-b-{name}"' in html
    assert {p.stem for p in (tmp_path / "p").iterdir()} == {f"{side}-{n}" for side in "ab" for n in CHARTS}


def test_simulate_html(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "sim.html"
    result = _cli("simulate", str(traces[0]), "--strategy", "capacity:cf=1.0", "--eplb", "gpus=4,replicas=12",
                  "--html", str(out), "--json")
    assert result.returncode == 0, result.stderr
    sim = json.loads(result.stdout)
    html = out.read_text(encoding="utf-8")
    for name in ("strategies", "strategies-balancedness", "eplb", "eplb-balancedness"):
        assert f'id="chart-{name}"' in html
    assert f"{sim['eplb']['eplb']['balancedness_mean']:.3f}" in html
    assert f"{sim['eplb']['contiguous']['balancedness_mean']:.3f}" in html


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--html", "/nonexistent-dir/r.html"], 1, "cannot write /nonexistent-dir/r.html"),
        (["--png", "/proc/version/x"], 1, "cannot write"),
        (["--html", "{tmp}/r.html", "--chart-layer", "9"], 1, "--chart-layer 9"),
        (["--chart-layer", "1"], 2, "--chart-layer only applies"),
    ],
)
def test_picture_errors_are_one_line(traces: tuple[Path, Path], tmp_path: Path, args: list[str], code: int,
                                     needle: str) -> None:
    result = _cli("report", str(traces[0]), *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_demo_balanced_and_unbalanced_heat_maps_differ(tmp_path: Path) -> None:
    """The demo's two trained checkpoints, recorded here: the unbalanced model's heat map is visibly more coloured."""
    pytest.importorskip("transformers")
    from moeprobe.demo.checkpoints import available

    if not {"balanced", "unbalanced"} <= set(available()):
        pytest.fail("the demo checkpoints are part of the package and must be shipped")
    demo = _cli("demo", "-o", str(tmp_path / "demo"), "--max-new-tokens", "4", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    balanced = _heat_colour(tmp_path / "demo" / "balanced", tmp_path / "png-balanced")
    unbalanced = _heat_colour(tmp_path / "demo" / "unbalanced", tmp_path / "png-unbalanced")
    assert unbalanced[1] > 2 * balanced[1], (balanced, unbalanced)
    assert unbalanced[0] > balanced[0], (balanced, unbalanced)


def test_a_trace_without_decisions_says_so(tmp_path: Path) -> None:
    from tests.support import layer_meta, write_trace

    empty = write_trace(tmp_path / "empty", {}, layers=layer_meta(1, 4, 2))
    out = tmp_path / "r.html"
    result = _cli("report", str(empty), "--html", str(out))
    assert result.returncode == 0, result.stderr
    assert "No routing decisions in this trace with these filters" in out.read_text(encoding="utf-8")
    result = _cli("report", str(empty), "--png", str(tmp_path / "png"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"moeprobe report: nothing to draw in {tmp_path / 'png'}: no routing decisions with these filters"


def test_simulate_html_replaces_the_text_table(traces: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "sim.html"
    result = _cli("simulate", str(traces[0]), "--strategy", "capacity:cf=1.0", "--html", str(out),
                  "-o", str(tmp_path / "sim-trace"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB)",
                                          f"wrote the simulated routing to {tmp_path / 'sim-trace'}"]
    html = out.read_text(encoding="utf-8")
    assert 'id="chart-strategies"' in html and "eplb" not in html.split('id="moeprobe-specs"')[0]


def test_without_vl_convert_the_error_says_what_to_install(traces: tuple[Path, Path], tmp_path: Path) -> None:
    # A vl_convert that cannot be imported, ahead of the real one on the path: as on a machine without the extra.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "vl_convert.py").write_text("raise ImportError(\"No module named 'vl_convert'\")\n", encoding="utf-8")
    env = run_cli_env()
    env["PYTHONPATH"] = f"{shadow}:{env['PYTHONPATH']}"
    for args in (["--html", str(tmp_path / "r.html")], ["--png", str(tmp_path / "png")]):
        result = subprocess.run([PYTHON, "-m", "moeprobe", "report", str(traces[0]), *args], capture_output=True,
                                text=True, env=env, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip() == ("moeprobe report: pictures need vl-convert-python: pip install 'moeprobe[html]' "
                                         "(or pip install vl-convert-python)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shadow"]
