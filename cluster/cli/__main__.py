"""`python -m expertmesh.cluster.cli`: the `expertmesh` command."""

import sys

from .main import main

sys.exit(main())
