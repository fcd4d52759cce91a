"""The demo page: what the build writes, what the server sends, and the page itself in
Debian's Chromium (headless, driven by Playwright): each digit asked for is the digit drawn,
the steps control sets the number of frames, the JavaScript walk is torch's walk, and a page
that cannot load its model or runtime says so in one sentence."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from diffusion101 import cli, commands, denoise, web
from diffusion101.config import UserError
from diffusion101.evaluate import load_classifier
from diffusion101.classifier import classify
from diffusion101.model_files import STUDENT_PATH, load_model

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_the_build_holds_the_page_models_and_runtime_within_20_mb(demo_page):
    files = {p.relative_to(demo_page).as_posix() for p in demo_page.rglob("*") if p.is_file()}
    assert files == {*web.PAGE_FILES, web.MARK, "models/models.json", "models/student.onnx",
                     "models/teacher.onnx", *(f"vendor/{n}" for n in web.RUNTIME_FILES)}
    assert sum((demo_page / f).stat().st_size for f in files) <= 20_000_000
    manifest = json.loads((demo_page / "models" / "models.json").read_text())
    assert manifest["student"]["steps"] == 4 and manifest["teacher"]["guidance"] == 1.75
    assert manifest["student"]["time_scale"] == 999.0  # flow's t on DDPM's timestep scale
    # nothing the page loads comes from elsewhere: every address in it is relative
    for name in web.PAGE_FILES:
        text = (demo_page / name).read_text()
        assert "http://" not in text and "https://" not in text, name


def test_a_folder_not_built_here_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a page built by diffusion101-demo"):
        web.build_page(tmp_path, log=lambda *a: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_runtime_archive_that_differs_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION101_CACHE", str(tmp_path))
    (tmp_path / f"{web.RUNTIME}-{web.RUNTIME_VERSION}.tgz").write_bytes(b"not the package")
    with pytest.raises(UserError, match="sha512 differs"):
        web.runtime_archive(log=lambda *a: None)


def test_the_command_serves_with_the_right_types_and_stops_on_ctrl_c(demo_page):
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--dir",
                             str(demo_page), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {demo_page} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        for name, kind in [("vendor/ort-wasm-simd-threaded.wasm", "application/wasm"),
                           ("vendor/ort.wasm.min.mjs", "text/javascript"),
                           ("demo.mjs", "text/javascript"), ("index.html", "text/html")]:
            with urllib.request.urlopen(url + name) as response:
                assert response.read() == (demo_page / name).read_bytes()
                assert response.headers["Content-Type"].split(";")[0] == kind, name
                assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "stopped" and err == ""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("DIFFUSION101_BROWSER") == "required":  # .ci/run installs it
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium")
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def _serve(folder):
    """The page's folder on a free port, in a thread, with the command's handler."""
    server = web.page_server(folder, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def _open(browser, url):
    page, problems = browser.new_page(), []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    return page, problems


def _wait_for_run(page, runs: int):
    page.wait_for_function(f"window.d101.error || (window.d101.timings.runs >= {runs} "
                           f"&& !window.d101.busy)", timeout=120_000)
    assert page.evaluate("window.d101.error") is None


def _canvas(page, selector) -> torch.Tensor:
    """The canvas's pixels as images in [-1, 1], (N, 1, S, S): N digits side by side."""
    data = page.evaluate(f"""() => {{ const c = document.querySelector('{selector}');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width,
        c.height).data)]; }}""")
    width, height, rgba = data
    grey = torch.tensor(rgba, dtype=torch.float32).view(height, width, 4)[..., 0]
    return (grey / 255 * 2 - 1).view(height, width // height, height).permute(1, 0, 2)[:, None]


def test_the_page_draws_each_digit_asked_for(browser, demo_page):
    server, url = _serve(demo_page)
    try:
        page, problems = _open(browser, url)
        _wait_for_run(page, 1)  # on load: all ten digits, both panels
        images = [_canvas(page, "#student-result"), _canvas(page, "#teacher-result")]
        labels = [torch.arange(10), torch.arange(10)]
        for digit in range(10):
            page.click(f"#digits button[data-label='{digit}']")
            _wait_for_run(page, digit + 2)
            for panel in ("student", "teacher"):
                images.append(_canvas(page, f"#{panel}-result"))
                labels.append(torch.tensor([digit]))
        clf, _ = load_classifier()
        predicted, _ = classify(clf, torch.cat(images))
        assert predicted.tolist() == torch.cat(labels).tolist()

        frames = {}  # the steps control: one frame (x_t and predicted x_0) a step
        for steps in ("1", "2", "4"):
            runs = page.evaluate("window.d101.timings.runs")
            page.select_option("#student-steps", steps)
            _wait_for_run(page, runs + 1)
            frames[steps] = page.locator("#student-frames .frame").count()
        assert frames == {"1": 1, "2": 2, "4": 4}
        assert page.locator("#student-frames .frame canvas").count() == 8
        assert problems == []
    finally:
        server.shutdown()


def test_the_javascript_walk_is_torchs_walk(browser, demo_page):
    """The page's Euler walk (demo.mjs) from a given x_T, against denoise.sample on torch."""
    model, _, cfg = load_model(STUDENT_PATH)
    model.eval()
    start = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([3, 5, 8])
    sampler = denoise.make_sampler(cfg.sample, cfg.diffusion)
    expected, _ = denoise.sample(model, sampler, labels, cfg.sample, start=start)
    server, url = _serve(demo_page)
    try:
        page, problems = _open(browser, url)
        _wait_for_run(page, 1)
        got = page.evaluate("""async ([start, labels]) => {
            const demo = await import('./demo.mjs');
            const x = await demo.walk(window.d101.nets.student, labels,
                {steps: 4, w: 1, start: Float32Array.from(start)});
            return Array.from(x); }""", [start.flatten().tolist(), labels.tolist()])
        assert problems == []
    finally:
        server.shutdown()
    assert (torch.tensor(got).view_as(expected) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("missing,said", [("models/student.onnx", "models/student.onnx could not be loaded"),
                                          ("vendor/ort.wasm.min.mjs", "ONNX runtime")])
def test_a_page_without_its_model_or_runtime_says_so_in_one_sentence(browser, demo_page, tmp_path,
                                                                      missing, said):
    broken = tmp_path / "page"
    shutil.copytree(demo_page, broken, copy_function=os.symlink)
    (broken / missing).unlink()
    server, url = _serve(broken)
    try:
        page, _ = _open(browser, url)
        page.wait_for_function("window.d101 && window.d101.error", timeout=60_000)
        sentence = page.inner_text("#status")
    finally:
        server.shutdown()
    assert said in sentence and sentence.endswith(".") and sentence.count(". ") == 0, sentence


def test_the_command_refuses_a_bad_port_or_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "page.txt").write_text("a file")
    for args, said in [(["--port", "70000"], "--port"),
                       (["--dir", str(tmp_path / "page.txt"), "--build-only"], "page.txt")]:
        assert cli.run_cli(commands.demo, args) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), (out, err)
        assert said in lines[0], lines
    assert (tmp_path / "page.txt").read_text() == "a file"
