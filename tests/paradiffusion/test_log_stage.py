"""Other libraries' output to a log file, one bar on the terminal, summary units."""

import subprocess
import sys

from paradiffusion.log import get_logger, stage_log_path, third_party_output_to
from paradiffusion.stage import StageSummary, progress


def test_third_party_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path, capfd):
    log_path = stage_log_path(str(tmp_path / "table"), "demo")
    assert log_path.startswith(str(tmp_path / "table" / "_logs" / "demo-"))
    with third_party_output_to(log_path) as console:
        print("a library's print")
        print("a library's warning", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "import sys; print('a child process'); sys.stderr.write('child err')"])
        get_logger("test").info("our message")
        bar = progress(None, total=3, desc="our bar", unit="x", file=console)
        bar.update(3)
        bar.close()
    print("after the block")
    out, err = capfd.readouterr()
    logged = open(log_path).read()
    for text in ("a library's print", "a library's warning", "a child process", "child err"):
        assert text in logged and text not in out + err
    assert "our message" in err and "our bar" in err and "our" not in logged
    assert "after the block" in out
    assert err.count("3/3") == 1  # the final state once, not twice


def test_summary_names_what_it_skipped():
    s = StageSummary("filter", n_in=10, n_out=7, skipped_done=3, skipped_unit="shards")
    assert "already done (skipped shards)  3" in s.render()
    assert s.to_dict()["skipped_unit"] == "shards"
    assert "already done (skipped)" in StageSummary("x", skipped_done=1).render()


def test_a_stream_kept_by_a_library_writes_to_the_terminal_after_the_block(tmp_path, capfd):
    import logging

    log_path = str(tmp_path / "x.log")
    with third_party_output_to(log_path):
        handler = logging.StreamHandler(sys.stderr)  # as Ray's logger does when set up inside the block
        lib = logging.getLogger("some.library")
        lib.addHandler(handler)
        lib.warning("inside")
    try:
        lib.warning("after")  # must not write to the closed log file
    finally:
        lib.removeHandler(handler)
    err = capfd.readouterr().err
    assert "after" in err and "inside" not in err
    assert "inside" in open(log_path).read()
