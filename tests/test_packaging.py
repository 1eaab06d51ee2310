"""The wheel holds every Python package under the code folders, as tandem.X."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_FOLDERS = ["engine", "services", "proto", "kvtransfer", "kernels", "benchmarks"]


def source_packages() -> set[str]:
    packages = set()
    for folder in CODE_FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT)
            packages.add("tandem." + ".".join(relative.parts))
    return packages


@pytest.mark.timeout(300)
def test_wheel_contains_every_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("tandem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = source_packages() - in_wheel
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {missing}"
    assert not any(n.startswith(("engine/", "kernels/")) for n in names), "bare top-level names"
    assert any(n.endswith("entry_points.txt") for n in names)


def test_every_code_folder_is_a_package():
    for folder in CODE_FOLDERS:
        assert (ROOT / folder / "__init__.py").exists(), folder
