"""``python -m sim --help``: the simulator's own command line.

jobs/simulate_search_log.py is the one that reads the project's config."""
import sys

from sim.searchlog import main

sys.exit(main())
