import sys

from medhotline.cli import main

sys.exit(main())
