"""`python -m jaxlora.cli ...` = the `jaxlora` console script."""

import sys

from jaxlora.cli.app import main

sys.exit(main())
