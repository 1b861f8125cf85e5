"""The campaign's environment: missing packages from the wheelhouse, and a description of the machine.

On a bare GPU image (torch but no diffusers, open_clip, webdataset, torch-fidelity) `prepare` installs the
carried wheelhouse (.whl/, `make wheelhouse`) offline into a private folder and puts it first on this
process's path and on every stage's PYTHONPATH; on a machine that has them (`make setup`) it installs
nothing. Nothing is ever fetched from a network.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

from benchmarks import wheelhouse

ROOT = Path(__file__).resolve().parents[1]
# Reported for every campaign: the stack the figures depend on.
VERSIONS = ("torch", "torchvision", "triton", "numpy", "diffusers", "open_clip_torch", "torch-fidelity",
            "webdataset", "timm", "huggingface-hub", "safetensors", "pillow", "matplotlib", "pytest", "ray")


def missing_packages() -> list[str]:
    """The wheelhouse's distributions this interpreter cannot import."""
    return [dist for dist, module in wheelhouse.IMPORTS.items() if importlib.util.find_spec(module) is None]


def prepare(wheels: Path, site: Path) -> dict:
    """Make the wheelhouse's packages importable here and in the stages; returns what was done, and the
    environment variables the stages run with."""
    missing = missing_packages()
    report: dict = {"missing_before": missing, "wheelhouse": str(wheels), "site": None}
    if missing:
        stamp = site / ".installed"
        names = sorted(p.name for p in Path(wheels).glob("*.whl"))
        if not names:
            report["problem"] = (f"{', '.join(missing)} missing and no wheelhouse at {wheels}: run `make wheelhouse` "
                                 "where a package registry is reachable and carry .whl along; the stages that "
                                 "need them will fail")
        elif not (stamp.is_file() and stamp.read_text().split() == names):
            wheelhouse.install(Path(wheels), site)
            stamp.write_text("\n".join(names))
        if names:
            sys.path.insert(0, str(site))
            importlib.invalidate_caches()
            report["site"] = str(site)
    report["missing_after"] = missing_packages()
    path = [p for p in (report["site"], str(ROOT), os.environ.get("PYTHONPATH")) if p]
    report["env"] = {"PYTHONPATH": os.pathsep.join(path)}
    return report


def stage_environment(extra: dict, work: Path, smoke: bool) -> dict:
    """The environment every stage runs in: offline hub, unbuffered logs, plain progress, one compile cache
    under the work folder (a re-run of a failed stage on a still-warm machine reuses its kernels). Toy
    sizes run on one thread: on shared cores, several threads per tiny op are slower, not faster."""
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if smoke else {}
    return {**os.environ, **extra, **threads, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
            "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "TRITON_CACHE_DIR": str(work / "triton-cache")}


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return done.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def describe() -> dict:
    """The machine and software stack, for the summary's header."""
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpu_cores": os.cpu_count(), "memory_gib": memory_gib(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "versions": {name: version(name) for name in VERSIONS}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                    nvidia_smi=nvidia_smi())
    return info


def machine_name(info: dict) -> str:
    """A short name for results files: the GPU's ("nvidia-h200"), else the CPU's core count ("cpu-2c")."""
    if info.get("gpu"):
        return "-".join(info["gpu"].lower().replace("_", " ").split())
    return f"cpu-{info.get('cpu_cores')}c"


def print_summary(info: dict, prepared: dict, file=sys.stdout) -> None:
    gpu = (f"{info['gpu']} x{info['gpu_count']} ({info['gpu_memory_gib']} GiB, sm {info['capability']}, "
           f"{info['multiprocessors']} SMs)" if info.get("gpu") else "no CUDA device")
    v = info["versions"]
    lines = [f"machine   {gpu}; {info['cpu_cores']} cores, {info['memory_gib']} GiB RAM",
             f"software  python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), "
             + ", ".join(f"{k} {v[k]}" for k in ("triton", "diffusers", "open_clip_torch", "torch-fidelity",
                                                 "webdataset", "ray") if k in v) ]
    if info.get("nvidia_smi"):
        lines.append(f"nvidia    {info['nvidia_smi']}")
    if prepared.get("missing_before"):
        lines.append(f"packages  {', '.join(prepared['missing_before'])} from the wheelhouse -> {prepared['site']}")
    if prepared.get("problem"):
        lines.append(f"problem   {prepared['problem']}")
    print("\n".join(lines), file=file, flush=True)
