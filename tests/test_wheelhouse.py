"""`make wheelhouse`: the wheels a bare GPU image lacks install offline into a private folder and import."""
import os
import platform
import re
import sys
from pathlib import Path

import pytest

from benchmarks import wheelhouse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The wheelhouse, downloaded for the GPU image (this machine's Python where it cannot install those)."""
    dest = tmp_path_factory.mktemp("whl")
    native = platform.machine() != "x86_64" or sys.platform != "linux"
    try:
        wheelhouse.download(dest, native=native)
    except wheelhouse.DownloadFailed as e:
        if e.unreachable:
            pytest.skip(f"no package registry reachable to download the wheelhouse: {str(e)[-200:]}")
        raise
    return dest


def test_pins_are_the_projects():
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    shared = {wheelhouse.normalise(n): v for n, v in pins.items()}
    for name, version in wheelhouse.WHEELS.items():
        assert shared.get(wheelhouse.normalise(name), version) == version, name
    assert "ray" not in map(wheelhouse.normalise, wheelhouse.WHEELS)  # too big to travel
    assert set(wheelhouse.IMPORTS) == set(wheelhouse.WHEELS)


@pytest.mark.slow
def test_the_wheelhouse_installs_offline_and_every_package_imports_from_it(wheels, tmp_path):
    paths = wheelhouse.wheels(wheels)
    assert len(paths) == len(wheelhouse.WHEELS) == len(list(wheels.glob("*.whl")))
    assert wheelhouse.size_mib(paths) < wheelhouse.DEFAULT_LIMIT_MIB
    target = tmp_path / "site"
    wheelhouse.install(wheels, target)  # pip install --no-index --no-deps --target
    imported = wheelhouse.imports_from(target)
    assert set(imported) == set(wheelhouse.IMPORTS.values())
    for module, file in imported.items():
        assert Path(file).is_relative_to(target), f"{module} came from {file}, not the wheelhouse"


def test_every_requirement_is_in_the_wheelhouse_or_on_the_gpu_image(wheels, monkeypatch):
    assert wheelhouse.unmet_requirements(wheels) == []
    # The check can fail: without wcwidth, ftfy's requirement is unmet.
    monkeypatch.setattr(wheelhouse, "WHEELS", {n: v for n, v in wheelhouse.WHEELS.items() if n != "wcwidth"})
    monkeypatch.setattr(wheelhouse, "GPU_IMAGE", wheelhouse.GPU_IMAGE - {"wcwidth"})
    assert any("ftfy" in p and "wcwidth" in p for p in wheelhouse.unmet_requirements(wheels))


def test_the_campaign_installs_missing_packages_from_the_wheelhouse_once(wheels, tmp_path, monkeypatch):
    """benchmarks.gpu on a bare image: what is missing comes from the wheelhouse, into a private folder that
    goes first on the stages' PYTHONPATH; a second campaign on the same machine installs nothing again."""
    import sys

    from benchmarks import environment

    monkeypatch.setattr(sys, "path", list(sys.path))
    missing = iter([["diffusers", "webdataset"], [], ["diffusers"], []])
    monkeypatch.setattr(environment, "missing_packages", lambda: next(missing))
    site = tmp_path / "site"
    report = environment.prepare(wheels, site)
    assert report["missing_before"] == ["diffusers", "webdataset"] and report["missing_after"] == []
    assert (site / "diffusers" / "__init__.py").is_file() and sys.path[0] == str(site)
    assert report["env"]["PYTHONPATH"].split(os.pathsep)[:2] == [str(site), str(ROOT)]
    stamp = (site / ".installed").stat().st_mtime_ns
    environment.prepare(wheels, site)
    assert (site / ".installed").stat().st_mtime_ns == stamp  # nothing reinstalled


def test_without_a_wheelhouse_the_campaign_says_how_to_make_one(tmp_path, monkeypatch):
    from benchmarks import environment

    monkeypatch.setattr(environment, "missing_packages", lambda: ["diffusers"])
    report = environment.prepare(tmp_path / "no-wheelhouse", tmp_path / "site")
    assert "make wheelhouse" in report["problem"] and report["site"] is None and not (tmp_path / "site").exists()
