"""``python -m flowar`` runs the command-line interface."""

import sys

from flowar.cli.main import main

sys.exit(main())
