"""`python -m moe_patch.cli ...` is the `moe-patch` command."""

import sys

from . import main

sys.exit(main())
