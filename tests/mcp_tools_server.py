"""A tiny MCP server (official SDK, FastMCP) for the agent's tool-binding tests.

`python mcp_tools_server.py` serves over stdio; `python mcp_tools_server.py --http PORT` serves
streamable HTTP on 127.0.0.1:PORT/mcp. `leak` returns $LEAKY_VALUE: the agent must redact it.
"""

import os
import sys

from mcp.server.fastmcp import FastMCP

port = int(sys.argv[2]) if sys.argv[1:2] == ["--http"] else 0
server = FastMCP("testtools", host="127.0.0.1", port=port or 8000, log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
def leak() -> str:
    """Returns a value the agent was told is secret."""
    return f"the value is {os.environ.get('LEAKY_VALUE', '')}"


@server.tool()
def fail() -> str:
    """Always fails."""
    raise ValueError("this tool always fails")


if __name__ == "__main__":
    server.run("streamable-http" if port else "stdio")
