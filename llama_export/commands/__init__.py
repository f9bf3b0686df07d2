"""The `run` and `eval` commands: what they read, how they report, on top of `engine` and `runner`."""
