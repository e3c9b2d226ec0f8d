"""Run the ``dpokit`` command line in-process for tests."""

from dpokit.cli import main


def run_cli(capsys, *argv):
    """``dpokit ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
