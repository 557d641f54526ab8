"""The engine installs next to the Hugging Face stack, and a built wheel is a working engine.

* The ops in the repository's ``kernels/`` folder are installed as ``engine_kernels`` (``kernels/`` has no
  ``__init__.py``), so Hugging Face's ``kernels`` package, which bitsandbytes and transformers import, is the
  one ``import kernels`` finds: from a user's folder and from the repository root, where pytest runs.
* The shipped datasets are package data of ``engine.data``: ``pip install .`` (not editable) gives an engine
  whose demo runs from any folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Run in a subprocess: the import name ``kernels`` belongs to Hugging Face's package, the engine imports too.
_COEXIST = """
import bitsandbytes, kernels, engine, engine_kernels.api
from engine.data.load import load_jsonl
assert callable(kernels.get_kernel), kernels.__file__
print("KERNELS_FILE", kernels.__file__)
print("ENGINE_OPS", len(engine_kernels.api.__all__), "ROWS", len(load_jsonl("train")))
"""


def _is_hugging_faces(kernels_file: Path) -> bool:
    """``kernels/__init__.py`` of an installed distribution, not the repository's ``kernels/`` folder."""
    return kernels_file.name == "__init__.py" and kernels_file.parent.parent.name in ("site-packages", "dist-packages")


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    full_env.pop("PYTHONPATH", None) if "PYTHONPATH" not in env else None
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_hugging_face_kernels_is_not_shadowed_in_the_test_process():
    """pytest runs from the repository root (on ``sys.path``), where a ``kernels/`` package would shadow HF's."""
    import kernels

    assert callable(kernels.get_kernel)
    assert _is_hugging_faces(Path(kernels.__file__))


@pytest.mark.slow
def test_engine_and_hugging_face_kernels_coexist_and_bitsandbytes_prints_nothing_more(tmp_path):
    """From a user's folder and from the repository root, ``import kernels`` is Hugging Face's, the engine and its
    ops import, and ``import bitsandbytes`` logs nothing beyond what it logs without the engine imported."""
    alone = _python("import bitsandbytes", tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for cwd in (tmp_path, ROOT):
        both = _python(_COEXIST, cwd)
        assert both.returncode == 0, both.stderr[-3000:]
        kernels_file = Path(both.stdout.split("KERNELS_FILE ")[1].split()[0])
        assert _is_hugging_faces(kernels_file), kernels_file
        assert "ENGINE_OPS 19 ROWS 2000" in both.stdout
        extra = set(both.stderr.splitlines()) - set(alone.stderr.splitlines())
        assert not extra, f"importing the engine made bitsandbytes print more (from {cwd}): {sorted(extra)}"
        assert str(ROOT / "kernels") not in both.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600, check=False, cwd=out,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (whl,) = out.glob("llm_finetune_engine-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_shipped_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {"engine_kernels/" + p.name for p in (ROOT / "kernels").glob("*.py")}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine" / "data").rglob("*.jsonl")}
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert not any(n.startswith(("kernels/", "data/", "tests/")) for n in names), sorted(names)[:20]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_outside_the_repository(wheel, tmp_path):
    """``pip install`` the wheel into a folder, then ``python -m engine.demo`` (1 step, 1 held-out question, 4-token answers) from
    a folder outside the repository, with that folder, not the repository, providing ``engine``."""
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import engine, engine_kernels.rms_norm, sys\n"
        f"assert engine.__file__.startswith({str(site)!r}), engine.__file__\n"
        f"assert engine_kernels.rms_norm.__file__.startswith({str(site)!r}), engine_kernels.rms_norm.__file__\n"
        "from engine.demo import main\n"
        "result = main(['--steps', '1', '--eval-rows', '1', '--batch-size', '2', '--max-new-tokens', '4'])\n"
        "print('DEMO_DONE', result['summary'] is not None)\n"
    )
    run = _python(code, work, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "DEMO_DONE True" in run.stdout
    assert "held-out exact match before fine-tuning" in run.stdout
