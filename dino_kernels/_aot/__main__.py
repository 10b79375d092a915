import sys

from dino_kernels._aot import main

sys.exit(main())
