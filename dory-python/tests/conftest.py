"""Fixtures of the ``dory`` test suite: the real servers and real processor processes (see
:mod:`support.fixtures`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.fixtures import *  # noqa: E402,F401,F403
