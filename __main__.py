"""`python -m agentfleet ...` is the `agentfleet` command."""

import sys

from agentfleet.ops.cli import main

sys.exit(main())
