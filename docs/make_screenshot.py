"""Regenerate docs/report-screenshot.png, the picture of the demo's HTML report in the README.

Renders ``moeprobe report TRACE --html`` in headless Chromium (the driver the browser test uses,
tests/browser.py), keeps the top of the page (heat map and MaxVio over time) and stores it as a 256-colour PNG
so that it stays well under 300 KB. Needs chromium and Pillow (the dev extra).

    .venv/bin/python -m moeprobe demo
    .venv/bin/python docs/make_screenshot.py traces/demo/unbalanced
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "report-screenshot.png")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=965, help="pixels of the page's top kept")
    args = parser.parse_args()

    from PIL import Image

    from tests import browser

    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        subprocess.run([sys.executable, "-m", "moeprobe", "report", args.trace, "--html", str(page)], check=True)
        result = browser.open_page(page, ready="document.body && document.body.dataset.rendered",
                                   evaluate="document.body.dataset.rendered", width=args.width, screenshot=True)
    if result.errors or not result.screenshot or not str(result.value).isdigit():
        raise SystemExit(f"the page did not render cleanly: {result.value} {result.errors}")
    with Image.open(io.BytesIO(result.screenshot)) as img:
        top = img.convert("RGB").crop((0, 0, img.width, min(img.height, args.height)))
        top.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
