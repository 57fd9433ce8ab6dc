"""bench/variants.py: each variant in a fresh process, and the rows measured so far written
after each one, so a benchmark stopped part way (a device's time limit) keeps them."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"

SCRIPT = textwrap.dedent(
    f"""
    import argparse, sys, time
    sys.path.insert(0, {str(BENCH)!r})
    from variants import run_variants, write_results

    def run_variant(args):
        if args.one == "broken":
            raise RuntimeError("this variant fails")
        if args.one == "slow":
            time.sleep(600)
        return {{"variant": args.one, "value": len(args.one)}}

    p = argparse.ArgumentParser()
    p.add_argument("--variants")
    p.add_argument("--out", type=__import__("pathlib").Path)
    p.add_argument("--one", default=None)
    args = p.parse_args()
    ran = run_variants(args, run_variant, __file__, ("ok", "broken", "slow"), stem="toy-{{device}}")
    if ran is not None:
        write_results(args.out, "toy-{{device}}", ran[0], args, ran[1] + [{{"final": True}}])
    """
)


def rows_written(out):
    (path,) = out.glob("toy-*.json")
    return json.loads(path.read_text())["rows"]


def test_rows_are_kept_after_each_variant(tmp_path):
    script = tmp_path / "toy.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "--out", str(out)]
    subprocess.run([*cmd, "--variants", "ok,broken"], check=True, capture_output=True)
    ok, broken, final = rows_written(out)
    assert ok == {"variant": "ok", "value": 2}
    assert broken["variant"] == "broken" and "this variant fails" in broken["error"]
    assert final == {"final": True}, "the caller's write replaces the partial one"

    for stale in out.glob("*.json"):
        stale.unlink()
    proc = subprocess.Popen([*cmd, "--variants", "ok,slow"], start_new_session=True)
    try:
        for _ in range(600):  # the first variant's row appears while the second still runs
            if list(out.glob("toy-*.json")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the slow variant should still be running"
        assert rows_written(out) == [{"variant": "ok", "value": 2}]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
