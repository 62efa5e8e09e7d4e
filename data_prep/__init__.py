"""Dataset builders and the tools that feed them (docs/DESIGN.md, section 3)."""
