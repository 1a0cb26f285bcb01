"""``python -m sim --help``: the simulator's command line (the config-driven one is jobs/simulate_search_log.py)."""
import sys

from sim.searchlog import main

sys.exit(main())
