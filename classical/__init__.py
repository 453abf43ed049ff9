"""Classical CNN baselines that the QCNN layer is compared against."""

from classical.networks import NETWORKS, AuthorsNet, LeNet5, conv_relu

__all__ = ["NETWORKS", "AuthorsNet", "LeNet5", "conv_relu"]
