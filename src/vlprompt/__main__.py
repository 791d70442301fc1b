"""`python -m vlprompt ...` runs the command line (also what `torchrun -m vlprompt train ...` uses)."""

import sys

from vlprompt.harness.cli.main import main

sys.exit(main())
