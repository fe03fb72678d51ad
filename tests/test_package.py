"""The build: the compiled core and the kernels folder are importable where the package says they are."""

from pathlib import Path

import fastjudge


def test_compiled_core_is_importable():
    from fastjudge import _C
    assert Path(_C.__file__).name.startswith("_C")


def test_kernels_folder_is_installed_as_fastjudge_kernels():
    import fastjudge.kernels as kernels
    repo = Path(__file__).resolve().parents[1]
    assert Path(kernels.__file__).resolve() == repo / "kernels" / "__init__.py"
    assert Path(fastjudge.__file__).resolve().parent == repo / "fastjudge"
