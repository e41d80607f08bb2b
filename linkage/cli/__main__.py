"""``python -m linkage.cli``: the same as the ``hhlink`` command."""

import sys

from linkage.cli import main

sys.exit(main())
