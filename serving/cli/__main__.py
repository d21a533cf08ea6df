"""`python -m serving.cli`: the `xorserve` console script."""

import sys

from serving.cli.main import main

sys.exit(main())
