"""The local executor: the Ray job's stages in this process and a pool, byte for byte the Ray job's output."""
import pytest

from conftest import SHAPES_FIXTURE
from pipeline import executors
from pipeline.__main__ import main
from pipeline.executors import ExecutorUnavailable, choose_executor
from pipeline.job import JobConfig, run
from pipeline.reader import ShardSet
from pipeline.sources import Preprocess, ShapesSource
from shard_sets import assert_same_shard_set


@pytest.mark.skipif(not executors.ray_installed(), reason="needs ray: the session's shapes set is then Ray's")
def test_local_executor_writes_the_ray_jobs_bytes(shapes_shards, tmp_path):
    out = tmp_path / "shapes"  # the same folder name as the fixture's: the manifest records it
    manifest = run(ShapesSource(**SHAPES_FIXTURE),
                   JobConfig(out=str(out), image_encoder="pixels", text_encoder="random", executor="local",
                             workers=2, preprocess=Preprocess(resolution=32, min_side=32), shard_size=64,
                             batch_size=256))
    assert manifest["timing"]["executor"] == "local"
    assert ShardSet(shapes_shards).manifest["timing"]["executor"] == "ray"
    assert_same_shard_set(out, shapes_shards)


def test_auto_is_ray_where_installed_else_local_with_a_notice(monkeypatch, capsys):
    monkeypatch.setattr(executors, "ray_installed", lambda: True)
    assert choose_executor("auto", None) == "ray" and capsys.readouterr().err == ""
    monkeypatch.setattr(executors, "ray_installed", lambda: False)
    assert choose_executor("auto", None) == "local"
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "local executor" in notice
    with pytest.raises(ExecutorUnavailable, match="--executor local"):
        choose_executor("ray", None)
    with pytest.raises(ExecutorUnavailable, match="needs Ray"):
        choose_executor("auto", "HEAD:6379")
    with pytest.raises(ExecutorUnavailable, match="--executor ray"):
        choose_executor("local", "HEAD:6379")


def test_an_unusable_executor_is_a_usage_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(executors, "ray_installed", lambda: False)
    out = tmp_path / "shapes"
    assert main(["shapes", "--out", str(out), "--train-images", "4", "--executor", "ray"]) == 2
    assert "pip install" in capsys.readouterr().err and not out.exists()
