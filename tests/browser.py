"""Headless Chromium for the tests of what a user reads: pictures of a page, and its layout at a given width.

``layout(pages, width)`` loads each page in an iframe exactly ``width`` CSS pixels wide (a window narrower than 500
px is not possible in headless Chromium; an iframe's viewport is its width, so a page's media queries see a phone) and
returns, per page, the width of its content (``scroll``) against the viewport's (``client``) and the rendered widths
of its images by alt text. One browser start for every page.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
FLAGS += ["--disable-sync", "--no-first-run", "--hide-scrollbars", "--allow-file-access-from-files"]

# Lines of the dependencies' log noise that rpo_fast's commands drop (rpo_fast/logs.py): a test of a command's output
# fails on any of them.
NOISE = (
    "Setting accelerator to CPU",
    "untested optimizer",
    "requires torchvision",
    "gemm_4bit_forward",
    "Skipping publisher trust check",
    "built successfully",
    "Unable to find hostfile",
    "Loading weights",
    "/torchao/_C",
    "Unable to import `torchao`",
    "is an Enum subclass",
)


def noise_in(text: str) -> list[str]:
    return [n for n in NOISE if n in text]


def screenshot(page: Path, png: Path, width: int, profile: Path):
    """Headless Chromium's picture of ``page`` at ``width`` x 2400 CSS pixels (flags as a closed network needs)."""
    import numpy as np
    from PIL import Image

    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},2400", f"--screenshot={png}"]
    res = subprocess.run([*cmd, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert png.exists(), res.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


PROBE = """<!doctype html><html><body style="margin:0">%s
<script>
let left = %d;
function measure(i) {
  const doc = document.getElementById('f' + i).contentDocument, d = doc.documentElement;
  const images = [...doc.querySelectorAll('img')].map(im => [im.alt, im.getBoundingClientRect().width]);
  document.body.setAttribute('data-p' + i, JSON.stringify({scroll: d.scrollWidth, client: d.clientWidth, images}));
  if (--left === 0) document.body.setAttribute('data-done', '1');
}
</script></body></html>"""


def layout(pages: list[Path], width: int, folder: Path) -> list[dict]:
    """The layout of each page at ``width`` CSS pixels (see the module's docstring)."""
    frames = "".join(
        f'<iframe id="f{i}" src="{html.escape(p.as_uri())}" onload="measure({i})" '
        f'style="width:{width}px;height:1600px;border:0;display:block"></iframe>'
        for i, p in enumerate(pages)
    )
    probe = folder / f"probe-{width}.html"
    probe.write_text(PROBE % (frames, len(pages)))
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={folder / 'profile'}", "--window-size=1400,1000"]
    cmd += ["--dump-dom", probe.as_uri()]  # at the page's load event, which waits for every frame's
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = dict(re.findall(r'data-p(\d+)="([^"]*)"', res.stdout))
    assert len(found) == len(pages), f"{len(found)} of {len(pages)} pages measured: {res.stderr[-2000:]}"
    return [json.loads(html.unescape(found[str(i)])) for i in range(len(pages))]
