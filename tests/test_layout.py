"""The package's shape, which a reader relies on: modules import downwards only (no cycle,
lazy imports inside functions included), the model never imports a job, imports sit at the top
of a module unless slow or optional, functions are short and take few parameters, scripts are
thin, and comments explain rather than report measurements."""
import ast
import dataclasses
import graphlib
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffusion101"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
TESTS = sorted((ROOT / "tests").glob("*.py"))


def _imports(path: Path) -> set:
    """The package modules `path` imports anywhere in it (top level or inside a function)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion101."):
            deps.add(node.module.split(".")[1])
    return deps & set(MODULES)


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_import_cycle_and_the_model_imports_no_job():
    graph = {name: _imports(path) for name, path in MODULES.items()}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) == set(MODULES)
    jobs = {"train", "train_run", "lora_finetune", "distill", "generate", "evaluate", "api", "cli",
            "commands", "model_files", "entry", "web"}
    for low in ("config", "presets", "settings", "classes", "memory", "cross_attn", "conv_block",
                "unet", "dit", "networks", "time_position_emb", "objective", "diffusion", "flow", "guidance",
                "denoise", "lora", "ema", "checkpoint", "files", "images", "fid", "dataset", "rng",
                "distributed", "speed", "train_state"):
        assert not graph[low] & jobs, (low, graph[low] & jobs)
    assert "unet" not in graph["checkpoint"]  # the file format knows no network
    assert not graph["diffusion"] - {"config", "objective"}  # the schedule knows no network either


# Imports that may wait inside a function: slow to import (torchvision about 1.5 s, matplotlib,
# TensorBoard), or not on every platform (fcntl).
LAZY = ("torchvision", "matplotlib", "torch.utils.tensorboard", "fcntl", "resource")


def test_imports_sit_at_the_top_unless_slow_or_optional():
    for name, path in MODULES.items():
        if name == "entry":  # its one job is to import the commands inside the boundary
            continue
        for func in _functions(path):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = ["." * node.level + (node.module or "")]
                else:
                    continue
                assert all(m.startswith(LAZY) for m in modules), (name, func.name, modules)


def test_functions_are_short_and_take_at_most_8_parameters():
    for name, path in MODULES.items():
        for func in _functions(path):
            assert func.end_lineno - func.lineno < 60, (name, func.name)
            a = func.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            count -= bool(a.args) and a.args[0].arg in ("self", "cls")
            # the public API's keyword options are the one exception
            assert count <= 8 or name == "api", (name, func.name, count)


def test_the_training_loop_is_written_as_loops_on_one_screen():
    tree = ast.parse(MODULES["train"].read_text())
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    assert fit.end_lineno - fit.lineno < 40
    loops = [n for n in ast.walk(fit) if isinstance(n, ast.For)]
    assert len(loops) == 2 and loops[1] in list(ast.walk(loops[0]))  # for epoch: for batch:
    body = ast.unparse(loops[1])
    # batch -> train_step -> log -> save -> evaluate -> stop, in that order, inside the batch loop
    steps = ["data.batch(", "train_step(", "log_loss(", "save(run, state)", "evaluate(run, state)",
             "out_of_budget("]
    positions = [body.index(s) for s in steps]
    assert positions == sorted(positions)
    # LoRA fine-tuning runs the same loop with a recipe of its own, not training's fields changed
    lora = MODULES["lora_finetune"].read_text()
    assert "fit(" in lora and "replace(cfg.train" not in lora


# The reading path of the README's "How it works", in order, and the package modules each may
# import: a reader follows it without opening the command-line, file-format or job modules.
READING_PATH = {
    "objective": {"config"},
    "diffusion": {"config", "objective"},
    "flow": {"config", "diffusion", "objective"},
    "meanflow": {"diffusion", "flow"},
    "time_position_emb": set(),
    "cross_attn": set(),
    "conv_block": {"config", "cross_attn"},
    "unet": {"config", "conv_block", "time_position_emb"},
    "dit": {"config", "time_position_emb"},
    "networks": {"config", "unet", "dit"},
    # fit's chores save, snapshot and evaluate; the run's set-up is train_run's
    "train": {"config", "objective", "denoise", "dataset", "speed", "train_state", "checkpoint",
              "distributed", "images", "posthoc_ema", "evaluate"},
    "denoise": {"config", "settings", "objective", "diffusion", "flow", "meanflow", "guidance",
                "memory"},
    "lora": {"config"},
}
JOBS = {"cli", "commands", "api", "generate", "model_files", "lora_finetune", "train_run",
        "distill"}


def test_the_reading_path_imports_only_what_a_reader_needs():
    readme = (ROOT / "README.md").read_text()
    how = readme.split("## How it works", 1)[1]
    stated = re.findall(r"`([a-z_]+)\.py`", how.split("\n\n", 2)[1])
    assert stated[:3] == ["objective", "diffusion", "flow"] and "lora" in stated
    for name, allowed in READING_PATH.items():
        got = _imports(MODULES[name])
        assert got <= allowed, (name, got - allowed)
        assert not got & JOBS, (name, got & JOBS)
    assert len(MODULES["train"].read_text().splitlines()) <= 350
    assert len(MODULES["config"].read_text().splitlines()) <= 300
    assert "shortcut" not in MODULES["cross_attn"].read_text()  # the plain attention


def test_scripts_are_thin_and_leave_sys_path_alone():
    import tomllib
    from diffusion101 import commands, entry
    for path in SCRIPTS:
        text = path.read_text()
        assert "sys.path" not in text, path.name
        tree = ast.parse(text)
        kinds = [type(n).__name__ for n in tree.body]
        # a docstring, imports, and `if __name__ == "__main__": sys.exit(main())`, where main
        # is an entry point of entry.py (the one-line boundary before the heavy imports)
        assert kinds[0] == "Expr" and kinds[-1] == "If", (path.name, kinds)
        assert set(kinds[1:-1]) <= {"Import", "ImportFrom"}, (path.name, kinds)
        assert ast.unparse(tree.body[-1].body[0]) == "sys.exit(main())", path.name
        assert re.search(r"^from diffusion101\.entry import \w+_command as main$", text, re.M)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(declared) == len(SCRIPTS)
    for command, target in declared.items():
        module, _, attr = target.partition(":")
        assert command.startswith("diffusion101-") and module == "diffusion101.entry"
        assert callable(getattr(entry, attr)), target
    # every entry point runs a command of commands.py
    names = {n.args[0].value for n in ast.walk(ast.parse(MODULES["entry"].read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_entry"}
    assert len(names) == len(declared) and all(callable(getattr(commands, n)) for n in names)


def test_the_entry_points_import_nothing_heavy():
    """entry.py and the package's __init__ stay light: torch (a second or more to import) is
    imported inside the one-line boundary, so that a Ctrl-C while it loads is one line too."""
    code = "import sys, diffusion101.entry; print(sorted(m for m in sys.modules if m in " \
           "('torch', 'numpy', 'diffusion101.commands', 'diffusion101.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# A measured figure: a percentage, or FID / accuracy followed by a number.
MEASURED = re.compile(r"\d\s?%|\bFID\b[^\n.,;]{0,12}\d|\baccuracy\b[^\n.,;]{0,12}\d"
                      r"|\bmeasured:", re.I)


def _comments_and_docstrings(path: Path):
    text = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def test_comments_explain_and_carry_no_measured_figures():
    for path in [*MODULES.values(), *SCRIPTS, *TESTS]:
        for line, text in _comments_and_docstrings(path):
            assert not MEASURED.search(text), f"{path.name}:{line}: {text.strip()[:120]}"


def test_the_readmes_module_map_names_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```\ndiffusion101/\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"\b([a-z_]+)\.py\b", block))
    assert named == set(MODULES), (set(MODULES) - named, named - set(MODULES))


# The seams a second network, a latent space and a third objective plug into.
def test_each_objective_lists_its_samplers_and_builds_them_one_way():
    from diffusion101.config import SampleConfig
    from diffusion101.denoise import OBJECTIVES
    from diffusion101.objective import Objective
    owners = {}
    for name, objective in OBJECTIVES.items():
        assert issubclass(objective, Objective) and objective.samplers, name
        assert objective.preview["sampler"] in objective.samplers, name
        for sampler, cls in objective.samplers.items():
            assert sampler not in owners, (sampler, owners.get(sampler), name)  # one table each
            owners[sampler] = name
            assert issubclass(cls, objective) and callable(cls.from_config)
    choices = next(f for f in dataclasses.fields(SampleConfig) if f.name == "sampler")
    assert set(choices.metadata["choices"]) == set(owners)  # and the config offers just these


def test_the_loss_and_the_loops_name_no_objective_and_no_backbone():
    """The loss, the training step and loop, and the sampling loop ask the objective and call
    the network; what either is appears nowhere in them (no name compared, no class tested)."""
    named = {"ddpm", "flow", "eps", "v", "unet", "objective", "backbone"}
    for module, functions in (("train", ("diffusion_loss", "train_step", "fit")),
                              ("denoise", ("predict", "sample"))):
        tree = ast.parse(MODULES[module].read_text())
        for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions):
            for node in ast.walk(func):
                assert not (isinstance(node, ast.Constant) and node.value in named), (func.name, node.value)
                assert not (isinstance(node, ast.Attribute) and node.attr in named), (func.name, node.attr)
                assert not (isinstance(node, ast.Name) and node.id == "isinstance"), func.name


def test_one_module_builds_the_network_and_none_beside_the_path_does_two_jobs():
    graph = {name: _imports(path) for name, path in MODULES.items()}
    builders = {name for name, deps in graph.items() if deps & {"unet", "dit"}}
    assert builders == {"networks"}, builders  # every other module takes whatever it builds
    assert not graph["settings"] & {"unet", "networks", "memory", "dataset"}  # it parses and checks
    assert not graph["classes"] - {"config"} and not graph["guidance"] - {"config"}
    for name, path in MODULES.items():  # each says its one job in its docstring's first line
        assert (ast.get_docstring(ast.parse(path.read_text())) or "").strip(), name
