"""``python -m ipop`` runs the command line."""

import sys

from ipop.cli.main import main

sys.exit(main())
