"""`cellblock mcp`: cellblock's sandboxes as tools of a Model Context Protocol server."""
