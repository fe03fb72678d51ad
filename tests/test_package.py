"""The build: the compiled core and the kernels folder are importable where the package says they are, and the
repository's top-level `kernels/` folder never shadows an installed package named `kernels`."""

import subprocess
import sys
import textwrap
from pathlib import Path

import fastjudge

REPO = Path(__file__).resolve().parents[1]


def test_compiled_core_is_importable():
    from fastjudge import _C
    assert Path(_C.__file__).name.startswith("_C")


def test_kernels_folder_is_installed_as_fastjudge_kernels():
    import fastjudge.kernels as kernels
    # the installed package's generated __init__ re-exports kernels/_api.py; its submodules are the folder's files
    assert Path(kernels._api.__file__).resolve() == REPO / "kernels" / "_api.py"
    assert Path(kernels.mllama_cross_attention.__file__).resolve() == REPO / "kernels" / "mllama_cross_attention.py"
    assert Path(fastjudge.__file__).resolve().parent == REPO / "fastjudge"
    for name in kernels.__all__:  # the public names, each from the module its docstring names
        assert callable(getattr(kernels, name)), name
    assert {"cross_attention", "fused_linear_cross_entropy", "shared_prefix_decode_attention"} <= set(kernels.__all__)
    assert "patch_mllama" not in kernels.__all__  # a transformers integration: fastjudge.models.mllama
    assert "Triton kernels" in kernels.__doc__


def test_repository_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    # a stand-in for Hugging Face's `kernels` (which transformers imports when it is installed), found through
    # PYTHONPATH, while the process runs from the repository root with the root first on sys.path
    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("STAND_IN = True\n")
    script = textwrap.dedent("""
        import sys
        assert sys.path[0] in ("", ".") or sys.path[0] == __import__("os").getcwd(), sys.path[:2]
        import kernels
        import fastjudge.kernels
        print(kernels.__file__)
        print(getattr(kernels, "STAND_IN", False))
        print(fastjudge.kernels.cross_attention.__module__)
    """)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    kernels_file, stand_in_seen, module = done.stdout.split()
    assert Path(kernels_file).resolve() == (stand_in / "__init__.py").resolve()
    assert stand_in_seen == "True"
    assert module == "fastjudge.kernels.mllama_cross_attention"

