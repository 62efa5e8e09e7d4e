"""Dataset builders and the tools that feed them (see DESIGN.md section 3)."""
