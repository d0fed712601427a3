"""Open a dashboard's index.html and one neuron page in headless Chromium; fail on console errors or missing files.

    python tests/browser/check_dashboard.py [DASHBOARD_DIR] [--screenshots DIR]

Without DASHBOARD_DIR it builds one with `tl-skill demo --quick --model tiny-gpt2`
in a temporary directory. It installs nothing: where no Chromium is found
(`chromium`, `chromium-browser`, `google-chrome`, or $CHROMIUM) it prints why and
exits 0 as skipped. Exit status 1 on a failure, naming the page and the error.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Chromium's own log noise that says nothing about the page
BENIGN = re.compile(
    r"dbus|Fontconfig|sandbox|GPU|gpu|viz|Vulkan|ALSA|pulse|crashpad|NetworkChange|"
    r"DevTools listening|CreatePlatformSocket|ozone|egl|GL ",
    re.I,
)
PROBLEMS = re.compile(r"CONSOLE|Uncaught|Failed to load resource|net::ERR_|Not allowed to load", re.I)


def find_browser() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).exists() else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def open_page(browser: str, page: Path, shot: Path) -> list[str]:
    """Screenshot `page`; returns the problems Chromium logged while loading it."""
    cmd = [
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,1800",
        f"--screenshot={shot}",
        page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    problems = [ln for ln in (res.stderr + res.stdout).splitlines() if PROBLEMS.search(ln) and not BENIGN.search(ln)]
    if res.returncode != 0:
        problems.append(f"chromium exited with status {res.returncode}: {res.stderr[-500:]}")
    if not shot.exists() or shot.stat().st_size < 2000:
        problems.append(f"no screenshot (or an empty one) at {shot}")
    return problems


def missing_files(page: Path) -> list[str]:
    """Local src/href targets of a page that do not exist (data: URIs and anchors are fine)."""
    text = page.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"#]+)"', text) + re.findall(r"(?:src|href)='([^'#]+)'", text)
    out = []
    for ref in refs:
        if ref.startswith(("data:", "http:", "https:", "mailto:")):
            if ref.startswith(("http:", "https:")):
                out.append(f"{page.name} loads {ref} from the network")
            continue
        if not (page.parent / ref).exists():
            out.append(f"{page.name} refers to {ref}, which does not exist")
    return out


def check(dashboard: Path, screenshots: Path, browser: str) -> list[str]:
    index = dashboard / "index.html"
    pages = sorted(dashboard.glob("neuron_L*_*.html"))
    if not index.exists() or not pages:
        return [f"{dashboard} has no index.html or no neuron page"]
    screenshots.mkdir(parents=True, exist_ok=True)
    problems = []
    for page in (index, pages[0]):
        problems += [f"{page.name}: {p}" for p in missing_files(page)]
        problems += [f"{page.name}: {p}" for p in open_page(browser, page, screenshots / (page.stem + ".png"))]
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dashboard", nargs="?", help="a dashboard directory (default: build one from the quick demo)")
    ap.add_argument("--screenshots", default=None, help="where the screenshots go (default: the dashboard dir)")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("skipped: no Chromium found (install the Debian package `chromium`, or set $CHROMIUM)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        dashboard = Path(args.dashboard) if args.dashboard else None
        if dashboard is None:
            demo = Path(tmp) / "demo"
            subprocess.run(
                [sys.executable, "-m", "tl_skill", "demo", "--quick", "--model", "tiny-gpt2", "--out", str(demo), "-q"],
                check=True,
                capture_output=True,
            )
            dashboard = demo / "dashboard"
        shots = Path(args.screenshots) if args.screenshots else dashboard
        problems = check(dashboard, shots, browser)
    if problems:
        print("dashboard check FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"dashboard check passed with {browser}: index.html and one neuron page, screenshots in {shots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
