"""`python -m fastjudge` (and `torchrun ... -m fastjudge`): the `fastjudge` command."""

import sys

from fastjudge.cli import main

sys.exit(main())
