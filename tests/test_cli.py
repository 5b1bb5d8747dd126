"""The command line: user errors are one line on stderr with exit code 2; the duality holds."""
import subprocess
import sys

import pytest

from resstream.cli import main
from resstream.duality import run_duality


def test_duality_identities_hold_to_rounding():
    results = run_duality(window=3, n_layers=5, tokens=12)
    for name, value in results["float32"].items():
        assert value < 1e-5, name
    for name, value in results["float64"].items():
        assert value < 1e-12, name


def test_duality_command_prints_both_identities(capsys):
    assert main(["duality", "--layers", "3", "--tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "depth read == sequence ShortSWA" in out and "float64" in out


def test_user_error_is_one_line_exit_2(capsys):
    assert main(["duality", "--window", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--window=0" in err and "Traceback" not in err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "resstream", "duality", "--window", "0"],
                            capture_output=True, text=True, timeout=300)  # a loaded machine
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "allowed" in result.stderr


@pytest.mark.parametrize("bench", ["attention", "operators", "decode"])
def test_bench_threads_below_one_is_a_user_error(capsys, bench):
    assert main(["bench", bench, "--threads", "0", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads=0" in err
