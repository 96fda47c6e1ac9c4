from lamscale.cli import main
import sys

sys.exit(main())
