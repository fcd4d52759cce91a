"""The package's shape, which a reader relies on: modules import downwards only (no
cycle, lazy imports inside functions included), the model never imports a job, and the job
modules keep their functions short enough to read."""
import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "diffusion101"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _imports(path: Path) -> set:
    """The package modules `path` imports anywhere in it (top level or inside a function)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion101."):
            deps.add(node.module.split(".")[1])
    return deps & set(MODULES)


def test_no_import_cycle_and_the_model_imports_no_job():
    graph = {name: _imports(path) for name, path in MODULES.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) == set(MODULES)
    jobs = {"train", "lora_finetune", "denoise", "evaluate", "api", "cli", "models"}
    for low in ("config", "cross_attn", "conv_block", "unet", "time_position_emb", "diffusion",
                "lora", "ema", "checkpoint", "files", "images", "fid", "dataset"):
        assert not graph[low] & jobs, (low, graph[low] & jobs)
    assert "unet" not in graph["checkpoint"]  # the file format knows no network


def test_job_modules_keep_functions_under_60_lines():
    for name in ("train", "lora_finetune", "denoise", "checkpoint", "api", "models"):
        tree = ast.parse(MODULES[name].read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, (name, node.name)
