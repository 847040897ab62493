"""The guest daemon: runs inside each VM and serves the host's control channel.

``protocol`` holds the wire messages (the host imports them from there);
``daemon`` the connection, the session and ``main``; ``harness`` the commands
and agent tasks it runs. Nothing here imports from the host side.
"""
