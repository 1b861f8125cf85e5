"""`make wheelhouse`: the wheels a bare GPU image lacks, downloaded here for an offline install there.

    python -m benchmarks.wheelhouse [--dest .whl] [--python-version 3.12] [--limit-mib 32]

The GPU machines this project is lent have torch, torchvision, numpy, pillow, scipy, matplotlib, timm,
huggingface_hub, safetensors, pyyaml, ... but none of diffusers, open_clip, torch-fidelity, webdataset and
their small dependencies, and they reach no package registry. So `make wheelhouse` fetches exactly those
wheels (never ray: its wheel alone is bigger than what may travel) for CPython 3.12 on manylinux x86_64
into `.whl/`, an ignored folder that travels with the working tree, and checks that every requirement of
every wheel is either in the wheelhouse or on the image. `python -m benchmarks.gpu` installs them offline
into a private folder (`install` below). docs/gpu-campaign.md says how to carry them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ifvit.cli import ArgumentParser, entry_point

# Distribution -> version: what the project uses (pyproject.toml pins the first four; the others are the
# versions `make setup` resolved when this list was made). One version each: two would stop the install.
WHEELS = {
    "diffusers": "0.42.1",
    "open_clip_torch": "3.3.0",
    "torch-fidelity": "0.4.0",
    "webdataset": "1.0.2",
    "ftfy": "6.3.1",  # open_clip's tokenizer
    "wcwidth": "0.9.4",  # ftfy's
    "braceexpand": "0.1.7",  # webdataset's shard patterns
    "importlib_metadata": "10.2.0",  # diffusers declares it
    "lazy-importer": "0.1.0",  # importlib_metadata 10 declares it below Python 3.15
}
# The module each distribution is imported as.
IMPORTS = {"diffusers": "diffusers", "open_clip_torch": "open_clip", "torch-fidelity": "torch_fidelity",
           "webdataset": "webdataset", "ftfy": "ftfy", "wcwidth": "wcwidth", "braceexpand": "braceexpand",
           "importlib_metadata": "importlib_metadata", "lazy-importer": "lazy_importer"}

# The GPU image's Python packages, as listed for the lent H200 machines (2026-11-17; 197 names), with the
# versions read there where one was. A requirement outside both this and WHEELS would be missing there.
GPU_IMAGE_PYTHON = "3.12"
GPU_IMAGE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
                      "safetensors": "0.8.0", "transformers": "5.17.0", "triton": "3.6.0", "tokenizers": "0.23.2"}
GPU_IMAGE = set(GPU_IMAGE_VERSIONS) | set("""
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
    pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
    tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
    toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp
""".split())

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TRAVEL_LIMIT_MIB = 64  # everything that travels to the GPU machine: working tree + carried folders
DEFAULT_LIMIT_MIB = 32  # the wheelhouse's share of it, leaving the other half for the working tree


# pip's words when it reaches no registry at all (as opposed to a pin it cannot find).
UNREACHABLE = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Network is unreachable", "Connection refused", "timed out")


class DownloadFailed(RuntimeError):
    """pip download failed; the message is pip's."""

    @property
    def unreachable(self) -> bool:
        return any(word in str(self) for word in UNREACHABLE)


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def download(dest: Path, python_version: str = GPU_IMAGE_PYTHON, native: bool = False) -> list[Path]:
    """Fetch the pinned wheels into `dest` (pip's cache makes a repeat quick); drop any other wheel there.
    `native` fetches for this machine's interpreter instead of the GPU image's."""
    dest.mkdir(parents=True, exist_ok=True)
    target = [] if native else ["--python-version", python_version, "--implementation", "cp",
                                *(f"--platform={p}" for p in PLATFORMS)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *target,
           "--dest", str(dest), *(f"{name}=={version}" for name, version in WHEELS.items())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise DownloadFailed(done.stderr.strip() or done.stdout.strip())
    wanted = {(normalise(n), v) for n, v in WHEELS.items()}
    for path in dest.glob("*.whl"):
        if wheel_name(path) not in wanted:
            path.unlink()  # an older pin's wheel: two versions of one package stop the whole install
    return wheels(dest)


def wheels(dest: Path) -> list[Path]:
    """The wheelhouse's wheels, one per pinned distribution; raises naming the fix when one is missing."""
    found = {wheel_name(p)[0]: p for p in Path(dest).glob("*.whl")}
    missing = [n for n in WHEELS if normalise(n) not in found]
    if missing:
        raise FileNotFoundError(f"the wheelhouse {dest} lacks {', '.join(missing)}: run `make wheelhouse` on a "
                                "machine with a package registry")
    return [found[normalise(n)] for n in WHEELS]


def requirements(wheel: Path, python_version: str = GPU_IMAGE_PYTHON) -> list:
    """The wheel's Requires-Dist entries that apply on the GPU image (Linux, `python_version`, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def unmet_requirements(dest: Path) -> list[str]:
    """Requirements met by neither the wheelhouse nor the GPU image (names, and versions where known)."""
    from packaging.version import Version

    have = {normalise(n): v for n, v in WHEELS.items()}
    problems = []
    for wheel in wheels(dest):
        for req in requirements(wheel):
            name = normalise(req.name)
            version = have.get(name) or GPU_IMAGE_VERSIONS.get(name)
            if name not in have and name not in GPU_IMAGE:
                problems.append(f"{wheel.name} needs {req}, which is neither in the wheelhouse nor on the GPU image")
            elif version and not req.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{wheel.name} needs {req}, but {name} {version} is what there is")
    return problems


def size_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def install(dest: Path, target: Path, python: str = sys.executable) -> None:
    """Install the wheelhouse offline into `target` (prepend it to sys.path / PYTHONPATH to use it)."""
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(target),
                    *map(str, wheels(dest))], check=True)


def imports_from(target: Path, python: str = sys.executable) -> dict[str, str]:
    """{module: file it was imported from}, every wheel's module imported in a fresh interpreter with
    `target` first on its path. Raises with the interpreter's error when one fails to import."""
    code = ("import importlib, json, sys; mods = sys.argv[1:]; "
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([python, "-c", code, *IMPORTS.values()], env=env, capture_output=True, text=True)
    if done.returncode:
        raise ImportError(f"importing the wheelhouse failed:\n{done.stderr[-3000:]}")
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


@entry_point
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m benchmarks.wheelhouse", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=".whl", help="the wheelhouse folder (default .whl, ignored by git)")
    p.add_argument("--python-version", default=GPU_IMAGE_PYTHON, help="the GPU image's Python (default 3.12)")
    p.add_argument("--native", action="store_true", help="wheels for this machine's Python instead")
    p.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB,
                   help=f"fail above this total (default {DEFAULT_LIMIT_MIB}; {TRAVEL_LIMIT_MIB} MiB travel in all)")
    args = p.parse_args(argv)
    dest = Path(args.dest)
    try:
        paths = download(dest, args.python_version, native=args.native)
    except DownloadFailed as e:
        print(f"{e}\nerror: pip could not download the wheels"
              + (": no package registry is reachable from here" if e.unreachable else ""), file=sys.stderr)
        return 1
    for path in paths:
        print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    total = size_mib(paths)
    print(f"{len(paths)} wheels, {total:.1f} MiB in {dest}/ (limit {args.limit_mib:g} MiB of the "
          f"{TRAVEL_LIMIT_MIB} MiB that travel); for Python {'here' if args.native else args.python_version}"
          f"{'' if args.native else ' on manylinux x86_64'}")
    problems = [] if args.native else unmet_requirements(dest)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if total > args.limit_mib:
        print(f"error: the wheelhouse is {total:.1f} MiB, over {args.limit_mib:g} MiB", file=sys.stderr)
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
