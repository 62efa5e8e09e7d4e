"""kpn-jax: keypoint-based pooling network with coherence learning for knee OA grading."""

__version__ = "0.1.0"
