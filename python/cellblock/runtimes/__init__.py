"""Warm runtimes: Python and Node interpreters kept running inside a session's sandbox.

`warm.py` is the host side (`outputs.py` checks the rich outputs); `zygote_py.py` (with
`display_py.py` in front of it) and `kernel_node.js` run inside the sandbox.
"""
