"""The two megabytes, named apart so that no module has to guess which one a figure uses.

Memory (RSS, weights held) counts in MiB, 2^20 bytes, as psutil, /proc and `free -m` do; bytes on
the wire count in MB, 10^6 bytes, as link rates (Mbit/s) do. Option and field names keep the
short `_mb` suffix; their help says which of the two it is.
"""

MIB = 2**20  # memory
MB = 10**6  # bytes sent or received
