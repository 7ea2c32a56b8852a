"""`python -m fuseport.cli`: the `fuseport` command."""

import sys

from fuseport.cli.commands import main

sys.exit(main())
