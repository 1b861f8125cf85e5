"""Two ways to run the same three stages of pipeline/stages.py over a job's shards.

    ray     Ray Data: load and write as CPU tasks, encode in an actor pool (one actor per GPU, else one CPU
            actor per node); joins a running cluster with --ray-address. The path for clusters and
            multi-node encoding.
    local   this process and a multiprocessing pool: the pool's workers load and write shards while this
            process encodes them (on its GPU when it has one). Needs no Ray: the path for one machine
            without it, such as a bare GPU image.

Both call the very same `load_shard`, `EncodeShard` and `write_shard`, so they write byte-identical shard
files (tests/test_executors.py); only the manifest's time stamps and timings differ.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import multiprocessing
import os
import pickle
import sys
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ifvit.errors import Unavailable
from pipeline.stages import EncodeShard, load_shard, write_shard

EXECUTORS = ("auto", "local", "ray")


class ExecutorUnavailable(Unavailable):
    """The requested executor cannot run here; the message names the fix."""


def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def choose_executor(requested: str, ray_address: str | None) -> str:
    """"ray" or "local" for a --executor choice; "auto" is ray where it is installed, else local (said once)."""
    if requested not in EXECUTORS:
        raise ExecutorUnavailable(f"unknown executor {requested!r}: choose one of {', '.join(EXECUTORS)}")
    if requested == "local" and ray_address:
        raise ExecutorUnavailable("--ray-address joins a Ray cluster, which needs --executor ray (or auto)")
    if requested == "auto":
        if ray_installed():
            return "ray"
        if ray_address:
            raise ExecutorUnavailable("--ray-address needs Ray: pip install 'ray[data]' (or drop --ray-address "
                                      "to encode on this machine with --executor local)")
        print("ray is not installed: encoding on this machine with the local executor (--executor local); "
              "install ray[data] for clusters and multi-node", file=sys.stderr, flush=True)
        return "local"
    if requested == "ray" and not ray_installed():
        raise ExecutorUnavailable("--executor ray needs Ray: pip install 'ray[data]', or pass --executor local")
    return requested


def absolute_spec(spec: str) -> str:
    """Local paths in an encoder spec made absolute: Ray workers do not share the driver's working dir."""
    if spec.startswith("local-dir:"):
        return "local-dir:" + str(Path(spec[len("local-dir:"):]).resolve())
    name, sep, rest = spec.rpartition(":")
    for candidate, prefix in ((spec, ""), (rest, name + sep)):
        if candidate and Path(candidate).exists():
            return prefix + str(Path(candidate).resolve())
    return spec


def encoder_kwargs(cfg, text_spec: str) -> dict:
    return {"image_spec": absolute_spec(cfg.image_encoder), "text_spec": text_spec,
            "batch_size": cfg.batch_size, "seed": cfg.seed}


def work_items(todo: list[dict]) -> list[dict]:
    """One row per shard: a shard is ragged (K captions an image), so it travels as one pickled dict."""
    return [{"shard": s["name"], "work": pickle.dumps(s)} for s in todo]


def progress(todo: list[dict], device: str) -> tqdm:
    return tqdm(total=sum(len(s["rows"]) for s in todo), unit="img", desc=f"encode ({device})", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------- ray

@contextmanager
def ray_session(address: str | None):
    """Join `address` (a running cluster: the multi-node path) or start a private local Ray; reuse one
    that is already initialised (tests)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Errors still surface as exceptions; Ray's info/warning chatter would bury the progress bar.
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(include_dashboard=False, **quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_ray(source, cfg, todo: list[dict], out, text_spec: str) -> None:
    with ray_session(cfg.ray_address) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts images; Ray's per-operator bars would interleave
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            pool = dict(compute=ray.data.ActorPoolStrategy(size=gpus), num_gpus=1, num_cpus=1)
        else:  # fractional CPUs: whole-CPU actors on a 2-core machine starve the load/write tasks (deadlock)
            nodes = sum(1 for n in ray.nodes() if n["Alive"])
            pool = dict(compute=ray.data.ActorPoolStrategy(size=nodes), num_cpus=0.5)
        # No actor restarts. Ray Data passes an actor pool's constructor arguments through the object store
        # and restarts its actors forever by default, a combination Ray's core cannot honour (a restart fails
        # once those arguments are evicted; ray-project/ray#53727) and says so in an error-level console line.
        # A crashed encoder then fails the job instead, and running the same command again resumes it.
        # Ray 2.60 takes max_restarts only among the generic remote arguments, which it marks deprecated.
        pool["max_restarts"] = 0
        items = work_items(todo)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = (ray.data.from_items(items, override_num_blocks=len(items))
                  .map(load_shard, fn_kwargs={"source": source, "preprocess": cfg.preprocess}, num_cpus=1)
                  .map_batches(EncodeShard, batch_size=1, fn_constructor_kwargs=encoder_kwargs(cfg, text_spec),
                               **pool)
                  .map(write_shard, fn_kwargs={"out": str(out)}, num_cpus=0.5))
        images_in = {s["name"]: len(s["rows"]) for s in todo}
        with progress(todo, f"ray, {gpus} GPU actor(s)" if gpus else "ray, CPU actor") as bar:
            for row in ds.iter_rows():
                bar.update(images_in[row["shard"]])


# ----------------------------------------------------------------------------------------- local

def pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it, else spawn; never a plain fork. This process holds other
    threads (Ray's driver threads, torch's, tqdm's monitor), and a child forked from it inherits their
    locks and signal handlers mid-use: a test run hung for 10 minutes in Pool.terminate, joining a worker
    that no longer answered SIGTERM. The fork server is a fresh single-threaded process that forks the
    workers; it preloads the stage module, so each worker starts in well under a second."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["pipeline.stages", "pipeline.sources"])
        return context
    return multiprocessing.get_context("spawn")


def run_local(source, cfg, todo: list[dict], out, text_spec: str) -> None:
    """Load and write in a pool of `cfg.workers` processes (default: every core), encode here.

    At most `2 x workers` shards are loaded ahead of the encoder and as many wait to be written, so memory
    stays bounded on a big source (Ray's backpressure does the same for the ray executor)."""
    workers = cfg.workers or os.cpu_count() or 1
    window = 2 * workers
    load = functools.partial(load_shard, source=source, preprocess=cfg.preprocess)
    write = functools.partial(write_shard, out=str(out))
    pending = deque(work_items(todo))
    images_in = {s["name"]: len(s["rows"]) for s in todo}
    # The pool first: its workers are forked before this process builds the encoder (or touches a GPU).
    with pool_context().Pool(workers) as pool:
        encoder = EncodeShard(**encoder_kwargs(cfg, text_spec))
        device = f"local, {'GPU' if encoder.codec.device.type == 'cuda' else 'CPU'} encoder + {workers} workers"
        loading, writing = deque(), deque()

        def top_up() -> None:
            while pending and len(loading) < window:
                loading.append(pool.apply_async(load, (pending.popleft(),)))

        with progress(todo, device) as bar:
            top_up()
            while loading:
                loaded = loading.popleft().get()  # in plan order, like Ray's
                top_up()
                # The Ray actor's own entry point, with a batch of one shard, as map_batches(batch_size=1) calls it.
                encoded = encoder({"shard": [loaded["shard"]], "work": [loaded["work"]]})
                writing.append(pool.apply_async(write, ({"shard": loaded["shard"], "work": encoded["work"][0]},)))
                while writing and (writing[0].ready() or len(writing) > window):
                    bar.update(images_in[writing.popleft().get()["shard"]])
            while writing:
                bar.update(images_in[writing.popleft().get()["shard"]])
