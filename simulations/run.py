"""`make simulate`: ``python -m simulations.run [--help]``, the simulation driver's entry point.

What the driver does, in order, is simulations/driver/__init__.py (also ``--help``); its pieces are
one module each in simulations/driver/.
"""
from __future__ import annotations

import sys

from simulations.driver.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        sys.exit(130)
