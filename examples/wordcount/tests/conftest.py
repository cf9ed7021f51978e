"""The wordcount example's end-to-end test uses the fixtures of the ``dory`` suite
(``dory-python/tests/support``)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent / "dory-python" / "tests"))
sys.path.insert(0, str(HERE.parent))

from support.fixtures import *  # noqa: E402,F401,F403
