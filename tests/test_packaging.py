"""What the package promises besides its ops: one version, a complete
``__all__``, type hints on the public API with a ``py.typed`` marker, no
runtime dependency but torch, and a clear error when the extension is
missing or broken. `make sdist-check` (tests/sdist_check.sh) builds and
installs the sdist and wheel."""

import inspect
import os
import shutil
import subprocess
import sys
import tomllib
import types

import pytest
import torch

import regops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _file:
    PYPROJECT = tomllib.load(_file)


def test_one_version_from_pyproject():
    assert regops.__version__ in (PYPROJECT["project"]["version"], "0+unknown")
    assert "version" not in PYPROJECT["project"].get("dynamic", [])


def test_runtime_dependencies_are_torch_alone():
    assert [d.split(">")[0].split("=")[0].strip() for d in PYPROJECT["project"]["dependencies"]] == ["torch"]
    imports = [line for path in _package_sources() for line in open(path)
               if line.lstrip().startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "numpy" in line]


def _package_sources():
    for directory, _, files in os.walk(os.path.join(ROOT, "regops")):
        yield from (os.path.join(directory, f) for f in files if f.endswith(".py"))


def test_all_is_complete_and_importable():
    public = {name for name, value in vars(regops).items()
              if not name.startswith("_") and getattr(value, "__module__", getattr(value, "__name__", "")).startswith(
                  "regops") and name not in ("ops", "triton")}
    assert public <= set(regops.__all__), public - set(regops.__all__)
    for name in regops.__all__:
        assert hasattr(regops, name), name
    assert len(regops.__all__) == len(set(regops.__all__))
    for module in (regops.nn, regops.optim):
        for name in module.__all__:
            assert hasattr(module, name), name


def _public_callables():
    for name in regops.__all__:
        value = getattr(regops, name)
        if isinstance(value, types.FunctionType):
            yield name, value
    for module in (regops.nn, regops.optim):
        for name in module.__all__:
            value = getattr(module, name)  # a class (its __init__) or a function (regops.optim.swap_averaged)
            yield f"{module.__name__}.{name}", value if isinstance(value, types.FunctionType) else value.__init__


@pytest.mark.parametrize("name,function", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_public_api_has_type_hints(name, function):
    signature = inspect.signature(function)
    unannotated = [p.name for p in signature.parameters.values()
                   if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not unannotated, f"{name}: {unannotated}"
    assert signature.return_annotation is not inspect.Signature.empty, name


def test_py_typed_ships():
    assert os.path.exists(os.path.join(os.path.dirname(regops.__file__), "py.typed"))
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["regops"]


@pytest.mark.parametrize("broken", [False, True], ids=["missing", "broken"])
def test_import_without_a_built_extension_says_how_to_build(tmp_path, broken):
    """The Python sources alone (no regops._C), or with a file that is not a
    loadable library in its place."""
    copy = tmp_path / "regops"
    shutil.copytree(os.path.dirname(regops.__file__), copy,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if broken:
        suffix = ".cpython-%d%d-x86_64-linux-gnu.so" % sys.version_info[:2]
        (copy / f"_C{suffix}").write_bytes(b"not a shared library")
    # An editable install (`make build`) maps regops' modules to the source
    # tree through a meta-path finder; dropped, so only the copy can be found.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import regops")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path), "REGOPS_CUDA_SIM": "0"})
    assert out.returncode != 0
    assert "ImportError: regops' compiled extension regops._C could not be loaded" in out.stderr, out.stderr
    assert "make build" in out.stderr and "pip install --no-build-isolation" in out.stderr
    assert f"torch {torch.__version__}" in out.stderr
