"""``python -m experiments``: the command line of :mod:`experiments.cli`, once the packages of
the ``experiments`` extra are found (one line naming what is missing, else)."""

import importlib.util
import sys

EXTRA = ("matplotlib", "tqdm", "filelock", "scipy")  # pyproject.toml's "experiments" extra
if missing := [name for name in EXTRA if importlib.util.find_spec(name) is None]:
    sys.exit(f"error: the experiments need {', '.join(missing)}: pip install -e '.[experiments]'")

from experiments.cli import main  # noqa: E402

main()
