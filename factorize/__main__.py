"""``python -m factorize``: the command line (:func:`factorize.cli.main`)."""

import sys

from factorize.cli import main

sys.exit(main())
