"""mnn-launch console entry point; the logic and the help live in mnn.distributed.launch.

    mnn-launch -n 2 -- mnn-train --dataset digits
    python -m mnn.scripts.launch --check
"""

import sys

from mnn.distributed.launch import main as launch_main

__all__ = ["main"]


def main() -> None:
    sys.exit(launch_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
