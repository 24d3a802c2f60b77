"""Reading a cache: open, decode, verify, health checks and statistics. Never imports the write side."""
