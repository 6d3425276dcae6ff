"""`python -m deco.cli ...` (and `torchrun -m deco.cli ...`): the `deco` command."""

import sys

from deco.cli import main

sys.exit(main())
