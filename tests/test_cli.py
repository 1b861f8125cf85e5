"""One command-line convention for every entry point (ifvit.cli): a user error prints one line saying what to
do and exits with status 2, without a traceback unless --debug; a job that ran and failed exits with 1."""
import importlib

import pytest

# (module whose main() is the command, arguments with a user error, words the one line must contain)
USER_ERRORS = [
    ("pipeline.__main__", ["table", "--table", "{tmp}/none.csv", "--image-root", "{tmp}", "--out", "{tmp}/o"],
     "no table at"),
    ("pipeline.__main__", ["shapes", "--bogus"], "unrecognized arguments"),
    ("pipeline.__main__", ["uvit-features", "--root", "{tmp}", "--out", "{tmp}/o"], "extract_empty_feature.py"),
    ("pipeline.__main__", ["verify", "{tmp}/none"], "pass the shard set"),
    ("pipeline.__main__", ["bench", "--shards", "{tmp}/none"], "no shard set at"),
    ("train.__main__", ["--variant", "if_concat", "--shards", "{tmp}/none", "--out", "{tmp}/run"], "make shards"),
    ("train.__main__", ["--variant", "late_fusion", "--shards", "{shards}", "--out", "{tmp}/run"],
     "unknown variant"),
    ("train.__main__", ["--variant", "early_concat", "--n-text", "1", "--shards", "{shards}", "--out", "{tmp}/run"],
     "use --variant if_concat_t1i0"),
    ("train.__main__", ["--variant", "if_concat", "--lr", "fast", "--shards", "{shards}", "--out", "{tmp}/run"],
     "--lr fast"),
    ("train.flops", ["--bogus"], "unrecognized arguments"),
    ("train.bench", ["--variants", "late_fusion"], "invalid choice"),
    ("evaluate.__main__", ["--run", "{tmp}/none"], "no run at"),
    ("evaluate.__main__", ["{tmp}/none", "--run", "{tmp}/none"], "name the run once"),
    ("evaluate.sample", ["--run", "{tmp}/none", "--prompt", "a red circle"], "no run at"),
    ("evaluate.compare", ["{tmp}/none", "--out", "{tmp}/report"], "no run could be read"),
    ("evaluate.attention", ["--run", "{tmp}/none", "--out", "{tmp}/attention"], "no run at"),
    ("evaluate.human", ["score", "{tmp}/sheet.csv", "--out", "{tmp}/scores"], "pass --key"),
    ("evaluate.report", ["{tmp}/none"], "no run at"),
]


@pytest.mark.parametrize("module, argv, words", USER_ERRORS, ids=[f"{m}:{a[0]}" for m, a, _ in USER_ERRORS])
def test_a_user_error_is_one_line_and_status_2(module, argv, words, tmp_path, shapes_shards, capsys):
    main = importlib.import_module(module).main
    argv = [a.format(tmp=tmp_path, shards=shapes_shards) for a in argv]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_debug_adds_the_traceback(tmp_path, capsys):
    from train.__main__ import main

    assert main(["--variant", "if_concat", "--shards", str(tmp_path), "--out", str(tmp_path / "r"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_job_that_ran_and_failed_is_status_1(shapes_shards, tmp_path, capsys):
    from train.__main__ import main

    assert main(["--variant", "if_concat", "--shards", str(shapes_shards), "--out", str(tmp_path / "nan"),
                 "--preset", "tiny", "--width", "32", "--depth", "3", "--heads", "2", "--patch-size", "8",
                 "--batch-size", "4", "--steps", "4", "--log-every", "2", "--preview-every", "0",
                 "--num-workers", "0", "--inject-nan-at-step", "2"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "loss became nan" in err[0]
