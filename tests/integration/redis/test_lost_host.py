"""A worker host lost for good, restarted, or cut off the network (tests/lib/lost_host.py)."""

from lost_host import *  # noqa: F401,F403
