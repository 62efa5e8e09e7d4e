"""Flax models: torchvision-layout ResNets and the keypoint-pooling network."""
