import sys

from shoal.server.frontproc.process import main

sys.exit(main())
