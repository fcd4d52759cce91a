"""The demo page: built into a folder of static files, served on 127.0.0.1.

The folder holds the page (web/index.html and web/demo.mjs, the walk in JavaScript), the shipped
student and flow model as ONNX graphs with models.json (what the walk needs of each config),
and onnxruntime-web's WebAssembly build, taken from its npm package, pinned by version and
checked by the integrity hash the registry publishes. Nothing is loaded from elsewhere at run
time, so the folder works from any static host as it is (one thread there; the server here
sends the headers that let onnxruntime use more).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .checkpoint import config_of, load_model_checkpoint
from .config import PRESSED, UserError
from .dataset import cache_dir
from .flow import FlowMatching
from .model_files import FLOW_PATH, STUDENT_PATH, export_for_sampling
from .classes import class_names

SOURCE = Path(__file__).parent / "web"
PAGE_FILES = ("index.html", "demo.mjs")
RUNTIME, RUNTIME_VERSION = "onnxruntime-web", "1.31.1"
# What the npm registry publishes as dist.integrity for that version (sha512 of the tarball)
RUNTIME_INTEGRITY = ("sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7Nm"
                     "uZPXrQ73k82URw==")
# The build without WebGPU and WebGL: the smallest that runs the graph (the .wasm is 15 MB)
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PANELS = {"student": STUDENT_PATH, "teacher": FLOW_PATH}
MARK = ".diffusion101-page"  # in a folder this module built, and so may build again


def runtime_archive(log=print) -> Path:
    """onnxruntime-web's npm tarball from the cache, else fetched with `npm pack`; either way
    checked against RUNTIME_INTEGRITY before use."""
    folder = cache_dir()
    path = folder / f"{RUNTIME}-{RUNTIME_VERSION}.tgz"
    if not path.is_file():
        log(f"fetching {RUNTIME}@{RUNTIME_VERSION} from the npm registry into {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", f"{RUNTIME}@{RUNTIME_VERSION}", "--silent",
                            "--pack-destination", str(folder)], check=True, capture_output=True,
                           text=True, timeout=600)
        except FileNotFoundError:
            raise UserError(f"the page's runtime comes from the npm registry and npm is not "
                            f"installed: install Node.js, or put {path.name} in {folder}") from None
        except subprocess.CalledProcessError as e:
            last = (e.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"npm pack {RUNTIME}@{RUNTIME_VERSION} failed: {last[:160]}") from None
    digest = base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    if f"sha512-{digest}" != RUNTIME_INTEGRITY:
        raise UserError(f"{path} is not the published {RUNTIME} {RUNTIME_VERSION} (its sha512 "
                        f"differs); remove it to fetch it again")
    return path


def page_settings(path, file_name: str) -> dict:
    """What the page's walk needs of a model file's config (models.json): the flow model's
    image shape, labels, time scale and sampler defaults."""
    cfg = config_of(load_model_checkpoint(path))
    if cfg.diffusion.objective != "flow":
        raise UserError(f"{path}: the page walks flow-matching models only (Euler steps), "
                        f"and this one is {cfg.diffusion.objective}")
    m, s = cfg.model, cfg.sample
    return {"file": file_name, "img_size": m.img_size, "channels": m.in_channels,
            "class_names": list(class_names(m)), "null_label": m.num_classes,
            "time_scale": FlowMatching(cfg.diffusion).time_scale, "clip": cfg.diffusion.clip,
            "steps": s.steps, "shift": s.shift, "guidance": s.guidance}


def build_page(out, panels: dict = PANELS, log=print) -> None:
    """Build the page into the folder `out`, in a staging folder beside it renamed into place
    at the end: a failure leaves the old page (or none), never half of one. `out` must be new
    or empty, or a page built here before (it holds MARK)."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).is_file():
        raise UserError(f"{out} exists and is not a page built by diffusion101-demo; "
                        f"choose another --dir")
    archive = runtime_archive(log)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "models").mkdir(parents=True)
        (staging / "vendor").mkdir()
        for name in PAGE_FILES:
            shutil.copyfile(SOURCE / name, staging / name)
        manifest = {}
        for panel, path in panels.items():
            manifest[panel] = page_settings(path, f"{panel}.onnx")
            export_for_sampling(path, staging / "models" / f"{panel}.onnx", log=lambda _: None)
        (staging / "models" / "models.json").write_text(json.dumps(manifest, indent=1) + "\n")
        with tarfile.open(archive) as tar:
            for name in RUNTIME_FILES:
                (staging / "vendor" / name).write_bytes(tar.extractfile(f"package/dist/{name}").read())
        (staging / MARK).write_text(f"built by diffusion101-demo from {RUNTIME} {RUNTIME_VERSION}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"built the page in {out} ({size / 1e6:.1f} MB)")


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the types a browser insists on for modules and WebAssembly, and the
    two headers that make the page cross-origin isolated (onnxruntime's threads need it)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):  # the terminal shows the address, not every request
        pass


class PageServer(http.server.ThreadingHTTPServer):
    """One thread a request; a browser that stops reading (a page closed or reloaded while
    the runtime downloads) is no error worth a traceback on the terminal."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def page_server(folder, port: int) -> PageServer:
    """The server of `folder` on 127.0.0.1:port (0: any free port), not yet serving."""
    return PageServer(("127.0.0.1", port), functools.partial(PageHandler, directory=str(folder)))


def serve(folder, port: int) -> None:
    """Serve `folder` on 127.0.0.1:port (0: any free port) until Ctrl-C, then stop cleanly."""
    try:
        server = page_server(folder, port)
    except OSError as e:
        raise UserError(f"cannot serve on 127.0.0.1:{port} ({e.strerror or e}); "
                        f"pass another --port, or --port 0 for any free one") from None
    # flushed: a program reading this line through a pipe needs the address now
    print(f"serving {folder} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how the server is meant to stop: handled
        PRESSED.clear()
        print("stopped", flush=True)
    finally:
        server.server_close()
