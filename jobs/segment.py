"""Ray job entrypoint: `ray job submit -- python jobs/segment.py --input ... --output ...`.

Takes the flags of `segpipe run` and calls the same code. Inside a Ray job, RAY_ADDRESS is set,
so the run joins the cluster instead of starting an embedded Ray.
"""

import sys

from segpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
