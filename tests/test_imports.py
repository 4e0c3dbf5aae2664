"""The layering, checked over every module: apo_core <- tasks <- flows.

apo_core is pure algorithm and model plumbing: it imports nothing of the pipeline (tasks, flows)
and no orchestration, tracking or storage library, and the pipeline's config types live in
tasks/config.py, not in the core.
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("apo_core", "tasks", "flows")
PIPELINE_LIBRARIES = ("prefect", "mlflow", "fsspec", "s3fs", "boto3", "polars")
MAY_NOT_IMPORT = {"apo_core": ("tasks", "flows", *PIPELINE_LIBRARIES), "tasks": ("flows",), "flows": ()}


def modules(package: str) -> list[str]:
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)]))


def imported(module: str) -> set[str]:
    """Top-level names of everything `module` imports (relative imports resolved), wherever in the file."""
    package = module.split(".")[0]
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def test_every_module_is_walked():
    assert {"apo_core.trainer", "apo_core.checkpoints", "tasks.config", "tasks.loading", "flows.cli"} <= {
        m for p in PACKAGES for m in modules(p)}


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rule(package):
    broken = {m: sorted(imported(m) & set(MAY_NOT_IMPORT[package])) for m in modules(package)}
    assert {m: bad for m, bad in broken.items() if bad} == {}


def test_apo_core_defines_no_pipeline_config_type():
    import apo_core.config as core
    import tasks.config as pipeline

    own = {name for name, value in vars(pipeline).items()
           if isinstance(value, type) and value.__module__ == "tasks.config"}
    assert {"ApoConfig", "StorageConfig", "TrackingConfig", "RegistryConfig", "OrchestrationConfig"} <= own
    assert own.isdisjoint(vars(core)), sorted(own & set(vars(core)))


def test_importing_all_of_apo_core_loads_no_pipeline_library():
    code = (f"import sys\nfor m in {modules('apo_core')!r}: __import__(m)\n"
            f"print(','.join(m for m in {PIPELINE_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"apo_core imported {out.stdout.strip()}"


def test_loading_a_model_leaves_scikit_learn_unimported_and_importable():
    # transformers' generation module imports sklearn.metrics (~140 MB resident) when scikit-learn is
    # installed (MLflow installs it); apo loads models without it, and it stays importable after.
    # the pipeline's preflight loads a tokenizer first: AutoTokenizer's module imports the model classes' too
    code = ("import sys\nfrom apo_core.modeling import load_model_and_tokenizer, load_tokenizer\n"
            "load_tokenizer('embedded')\nmodel, tok = load_model_and_tokenizer('embedded', 'float32', 'cpu')\n"
            "import transformers.generation.candidate_generator as cg\n"
            "print('sklearn' in sys.modules, cg.is_sklearn_available())\n"
            "import sklearn.metrics\nprint(callable(sklearn.metrics.roc_curve))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False", "True"], out.stdout + out.stderr
