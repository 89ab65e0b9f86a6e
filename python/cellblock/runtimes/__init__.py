"""Warm runtimes: Python and Node interpreters kept running inside a session's sandbox.

`warm.py` is the host side; `zygote_py.py` and `kernel_node.js` run inside the sandbox.
"""
