"""PyTorch interop: weight conversion and a reference implementation."""
