"""`python -m minimal_amkp`: the whole job end to end (see cli.py for the options)."""
import os
import sys

# Before torch loads OpenMP: idle threads sleep instead of spinning, which costs nothing on
# an idle machine and keeps a shared one (other jobs on the same cores) from grinding to a halt.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from minimal_amkp.run.cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
