"""``python -m darkroom.cli``: the same as the ``darkroom`` command."""

import sys

from darkroom.cli.main import main

sys.exit(main())
