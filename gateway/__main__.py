"""`python -m gateway`: the same verbs as the `tallygate` command."""

import sys

from gateway.cli import main

sys.exit(main())
