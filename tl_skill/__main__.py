import sys

from tl_skill.cli import main

sys.exit(main())
