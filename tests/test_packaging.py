"""The top-level ``kernels/`` folder never hides an installed ``kernels`` package (transformers imports
the Hugging Face one at every model load), from any working directory and any way of starting Python,
while ``fastprocon.kernels`` resolves to it: from the repository root, from an install, from a wheel."""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import kernels, fastprocon.kernels.procon_projection as p
print(kernels.__file__)
print(p.__file__)
"""


def run(args, cwd, pythonpath=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    # a session of its own, so a timeout also ends torchrun's workers, not only the launcher
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args} timed out:\n{out[-2000:]}\n{err[-4000:]}")
    assert proc.returncode == 0, f"{args} failed:\n{out[-2000:]}\n{err[-4000:]}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site(tmp_path):
    """A stand-in for an installed ``kernels`` package, plus the check as a module for ``python -m``."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("")
    (site / "check_kernels.py").write_text(CHECK)
    return site


def resolved(out):
    kernels_file, fastprocon_kernels_file = out.strip().splitlines()[-2:]
    return Path(kernels_file), Path(fastprocon_kernels_file)


@pytest.mark.parametrize("repo_first", [False, True], ids=["cwd", "pythonpath-repo-first"])
def test_python_dash_m_from_the_repository_root(site, repo_first):
    # `python -m` puts the working directory first on sys.path; a subprocess given PYTHONPATH=<repo>
    # puts the repository before site-packages too.
    path = [REPO, site] if repo_first else [site]
    kernels_file, kernel_module = resolved(run(["-m", "check_kernels"], cwd=REPO, pythonpath=path))
    assert kernels_file == site / "kernels" / "__init__.py"
    assert kernel_module.resolve() == REPO / "kernels" / "procon_projection.py"


def test_python_from_another_directory(site, tmp_path):
    kernels_file, kernel_module = resolved(run(["-m", "check_kernels"], cwd=tmp_path, pythonpath=[site]))
    assert kernels_file == site / "kernels" / "__init__.py"
    assert kernel_module.resolve() == REPO / "kernels" / "procon_projection.py"


def test_a_wheel_carries_the_kernels_as_fastprocon_kernels(site, tmp_path):
    source, wheels = tmp_path / "source", tmp_path / "wheels"   # built from a copy: no build/ left in the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, source / name)
    for name in ("kernels", "fastprocon"):   # fastprocon/kernels stays a link to ../kernels
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    source], check=True, capture_output=True, timeout=300)
    wheel, = wheels.glob("fastprocon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastprocon/kernels/procon_projection.py" in names
    layers = {p.name for p in (REPO / "fastprocon").iterdir() if (p / "__init__.py").exists()}
    assert {n.split("/")[1] for n in names if n.startswith("fastprocon/") and n.count("/") > 1} >= layers
    assert "fastprocon/data/builtin/benign.json" in names and "fastprocon/configs/default.toml" in names
    assert not [n for n in names if n.startswith("kernels/")], names
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)      # what `pip install --target` lays out
    kernels_file, kernel_module = resolved(run(["-m", "check_kernels"], cwd=tmp_path, pythonpath=[target, site]))
    assert kernels_file == site / "kernels" / "__init__.py"
    assert kernel_module == target / "fastprocon" / "kernels" / "procon_projection.py"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="no kernels package installed")
def test_torchrun_dash_m_from_the_repository_root_loads_models(tmp_path):
    # the real installed package (transformers imports it when a model class loads), through the
    # README's multi-process command started from the repository root
    out = run(["-c", "import kernels; print(kernels.__file__)"], cwd=REPO, pythonpath=[REPO])
    assert Path(out.strip()).resolve().parent != REPO / "kernels", out
    out = run(["-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               "-m", "fastprocon.cli", "train", "--config", "tiny", f"run_dir={tmp_path}", "max_steps=1",
               "export=false"],
              cwd=REPO, pythonpath=[REPO], timeout=300)
    assert (tmp_path / "metrics.jsonl").exists(), out[-2000:]
