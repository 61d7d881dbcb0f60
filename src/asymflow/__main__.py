"""``python -m asymflow``: the command line of :mod:`asymflow.cli`."""

from asymflow.cli import app

if __name__ == "__main__":
    app(prog_name="asymflow")
