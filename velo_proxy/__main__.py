import sys

from velo_proxy.cli import main

sys.exit(main())
