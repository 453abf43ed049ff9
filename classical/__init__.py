"""Classical CNN baselines that the QCNN is compared against, by name: the authors' network,
and the architectures every CNN course teaches, at MNIST size."""

from classical.deep import VGG, AlexNet, GoogLeNet, ResNet
from classical.networks import AuthorsNet, LeNet5, conv_relu

NETWORKS = {
    "authors": AuthorsNet,
    "lenet5": LeNet5,
    "alexnet": AlexNet,
    "vgg": VGG,
    "googlenet": GoogLeNet,
    "resnet": ResNet,
}

__all__ = ["NETWORKS", "VGG", "AlexNet", "AuthorsNet", "GoogLeNet", "LeNet5", "ResNet", "conv_relu"]
