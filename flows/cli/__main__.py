"""`python -m flows.cli`: the `reltag` command."""

import sys

from flows.cli import main

sys.exit(main())
