"""`python -m jaxlora ...` = the `jaxlora` console script."""

import sys

from jaxlora.cli.app import main

sys.exit(main())
