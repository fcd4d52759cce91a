"""The demo page's speed in headless Chromium: cold loads, each in a fresh browser context (no
cache, so the runtime is fetched and compiled every time), timed by the page itself
(window.d101.timings, in ms from the start of navigation):

  ready        the runtime and the student loaded
  first frame  the first step of the first walk drawn (the page opens on all ten digits)
  first grid   that first walk: 4 steps of the ten digits, the runtime's code still cold
  grid         the same walk again, clicked ("all"), median of --clicks, once warm

for one thread (what a plain static host gives: no cross-origin isolation) and for the threads
onnxruntime takes on a cross-origin-isolated page (what diffusion101-demo serves). Also the
page's size, and with --screenshot the picture in the README.

  python benchmarks/web_speed.py --loads 5 --clicks 5 --screenshot imgs/demo.png
"""
import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion101 import web  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def one_load(browser, url, clicks: int, screenshot=None) -> dict:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("window.d101.error || window.d101.timings.runs >= 1", timeout=120_000)
    assert page.evaluate("window.d101.error") is None, page.evaluate("window.d101.error")
    t = page.evaluate("window.d101.timings")
    nav = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    grids = []
    for i in range(clicks):
        page.click("#digits button[data-label='all']")
        page.wait_for_function(f"window.d101.timings.runs >= {i + 2} && !window.d101.busy")
        grids.append(page.evaluate("window.d101.timings.student.ms"))
    context.close()
    return {"load event": nav, "ready": t["ready"], "first frame": t["firstFrame"],
            "first grid": t["student"]["ms"], "grid": statistics.median(grids) if grids else 0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--dir", default=None, help="a page built already (default: build one)")
    p.add_argument("--screenshot", default=None, help="write the page as opened here (PNG)")
    a = p.parse_args()
    from playwright.sync_api import sync_playwright
    folder = Path(a.dir) if a.dir else Path(tempfile.mkdtemp()) / "demo"
    if not a.dir:
        web.build_page(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"page: {size / 1e6:.2f} MB in {folder}")
    server = web.page_server(folder, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        for label, query in (("1 thread", "?threads=1"), ("isolated", "")):
            rows = [one_load(browser, url + query, a.clicks,
                             a.screenshot if (i == 0 and query == "") else None)
                    for i in range(a.loads)]
            print(f"{label}: median of {a.loads} cold loads (ms from navigation start)")
            for key in rows[0]:
                values = [r[key] for r in rows]
                print(f"  {key:12s} {statistics.median(values):7.0f}   "
                      f"(min {min(values):.0f}, max {max(values):.0f})")
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    main()
