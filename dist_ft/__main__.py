"""``python -m dist_ft`` is ``dist-ft``."""

import sys

from dist_ft.cli.main import main

sys.exit(main())
