"""`python -m vmupdate_operator`: the same as the `vmupdate-operator` command."""

import sys

from vmupdate_operator.main import main

sys.exit(main())
