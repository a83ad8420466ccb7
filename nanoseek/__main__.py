from nanoseek.cli import main
import sys
sys.exit(main())
