"""The scalar argument checks (`checks_safe_llava.py`), and the rule that nothing else spells the bool guard: `bool` is
a subclass of `int`, so each hand-written `isinstance(x, bool) or not isinstance(x, int)` is a copy of the same check
that can drift. A source scan finds such copies anywhere in the package, the benchmarks, the examples and the tests."""

import ast
from pathlib import Path

import numpy as np
import pytest

import modeling_safe_llava
from modeling_safe_llava.checks_safe_llava import (
    check_bool,
    check_integer,
    check_number,
    is_integer,
    is_number,
    is_real,
)


REPO_ROOT = Path(modeling_safe_llava.__file__).parent.parent
SCANNED = ("modeling_safe_llava", "benchmarks", "examples", "tests")
CHECKS_FILE = REPO_ROOT / "modeling_safe_llava" / "checks_safe_llava.py"
NUMERIC_TYPES = {"int", "float", "Real", "Integral", "Number", "complex"}


# -- the checks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, integer, number, real", [
    (3, True, True, True),
    (True, False, False, False),
    (False, False, False, False),
    (2.5, False, True, True),
    (np.float32(0.5), False, False, True),
    (np.int64(2), False, False, True),
    ("3", False, False, False),
    (None, False, False, False),
])
def test_predicates_refuse_bools_and_non_numbers(value, integer, number, real):
    assert (is_integer(value), is_number(value), is_real(value)) == (integer, number, real)


def test_check_integer_returns_the_value_and_names_the_bounds():
    assert check_integer("n", 0, minimum=0) == 0
    assert check_integer("n", 10**12, minimum=1) == 10**12
    assert check_integer("n", 4, 1, 4) == 4
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got True\.$"):
        check_integer("n", True)
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0, got -1\.$"):
        check_integer("n", -1, minimum=0)
    with pytest.raises(ValueError, match=r"^n must be an integer in \[1, 4\], got 5\.$"):
        check_integer("n", 5, 1, 4)
    with pytest.raises(ValueError, match=r"^n must be an integer in \[1, 4\], got 2\.0\.$"):
        check_integer("n", 2.0, 1, 4)


@pytest.mark.parametrize("value", [0, 0.0, 3, 2.5, 10**400])
def test_check_number_takes_finite_numbers_at_or_above_the_minimum(value):
    assert check_number("w", value) == value


@pytest.mark.parametrize("value", [True, "1", None, float("nan"), float("inf"), -0.5, [1.0]])
def test_check_number_refuses_the_rest(value):
    with pytest.raises(ValueError, match=r"^w must be a finite number >= 0, got "):
        check_number("w", value)


def test_check_number_strict_refuses_the_minimum_itself():
    assert check_number("t", 1e-9, strict=True) == 1e-9
    with pytest.raises(ValueError, match=r"^t must be a finite number > 0, got 0\.$"):
        check_number("t", 0, strict=True)


@pytest.mark.parametrize("value", [True, False])
def test_check_bool_takes_bools(value):
    assert check_bool("flag", value) is value


@pytest.mark.parametrize("value", ["False", 0, 1, None, np.bool_(True)])
def test_check_bool_refuses_truthy_and_falsy_stand_ins(value):
    with pytest.raises(ValueError, match=r"^flag must be True or False, got "):
        check_bool("flag", value)


# -- no copies of the guard elsewhere --------------------------------------------------------------------------------


def _type_names(node) -> set[str]:
    """The type names an `isinstance` second argument mentions (`bool`, `(int, float)`, `numbers.Real`...)."""
    nodes = node.elts if isinstance(node, ast.Tuple) else [node]
    return {n.id if isinstance(n, ast.Name) else n.attr for n in nodes if isinstance(n, (ast.Name, ast.Attribute))}


def _isinstance_types(node) -> list[set[str]]:
    return [
        _type_names(call.args[1])
        for call in ast.walk(node)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "isinstance"
        and len(call.args) == 2
    ]


def _is_bool_guard(node) -> bool:
    if isinstance(node, ast.BoolOp):  # isinstance(x, bool) or not isinstance(x, int), and the `and not` form
        types = _isinstance_types(node)
        refuses_bool_first = isinstance(node.op, ast.Or) and any(_isinstance_types(v) == [{"bool"}] for v in node.values
                                                                  if isinstance(v, ast.Call))  # isinstance(x, bool) or ...
        return refuses_bool_first or (any(t == {"bool"} for t in types) and any(t & NUMERIC_TYPES for t in types))
    if isinstance(node, ast.Compare):  # type(x) is bool
        operands = [node.left, *node.comparators]
        calls_type = any(isinstance(o, ast.Call) and isinstance(o.func, ast.Name) and o.func.id == "type" for o in operands)
        return calls_type and any(isinstance(o, ast.Name) and o.id == "bool" for o in operands)
    if isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not):
        # if not isinstance(x, bool): raise ValueError(...)  -- check_bool's job
        raises = node.body and isinstance(node.body[0], ast.Raise) and isinstance(node.body[0].exc, ast.Call)
        return bool(raises) and getattr(node.body[0].exc.func, "id", None) == "ValueError" and (
            _isinstance_types(node.test) == [{"bool"}]
        )
    return False


def find_bool_guards(source: str, where: str = "<snippet>") -> list[str]:
    """`where:line` of each hand-written bool guard in `source`."""
    lines = sorted({node.lineno for node in ast.walk(ast.parse(source)) if _is_bool_guard(node)})
    return [f"{where}:{line}" for line in lines]


@pytest.mark.parametrize("snippet", [
    "if isinstance(x, bool) or not isinstance(x, int):\n    raise ValueError('x')",
    "ok = isinstance(x, int) and not isinstance(x, bool) and x > 0",
    "if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:\n    pass",
    "import numbers\nbad = isinstance(x, bool) or not isinstance(x, numbers.Real)",
    "if isinstance(stage, bool) or stage not in aliases:\n    raise ValueError('stage')",
    "if type(x) is bool:\n    raise TypeError('x')",
    "if type(x) is not bool:\n    raise TypeError('x')",
    "if not isinstance(flag, bool):\n    raise ValueError(f'flag must be True or False, got {flag!r}.')",
])
def test_the_scan_finds_a_planted_guard(snippet):
    assert len(find_bool_guards(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    "if isinstance(value, bool):\n    return 'yes' if value else 'no'",  # formatting a bool is not a guard
    "if not isinstance(stream, bool):\n    raise wrong_type('stream', 'a boolean', stream)",  # an HTTP error
    "ok = is_integer(x) and x > 0",
    "kinds = isinstance(x, (str, bool))",
])
def test_the_scan_leaves_other_bool_checks_alone(snippet):
    assert find_bool_guards(snippet) == []


def test_no_file_spells_the_bool_guard_but_the_checks_module():
    files = [path for folder in SCANNED for path in sorted((REPO_ROOT / folder).rglob("*.py")) if path != CHECKS_FILE]
    assert REPO_ROOT / "modeling_safe_llava" / "safety_config_safe_llava.py" in files  # the walk covers the package
    found = [hit for path in files for hit in find_bool_guards(path.read_text(), str(path.relative_to(REPO_ROOT)))]
    assert found == []
    assert find_bool_guards(CHECKS_FILE.read_text()) != []  # the one copy is where the scan would see it
