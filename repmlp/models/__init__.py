"""The zoo; importing it registers every model with timm."""
from .resnet import RepMLPResNet
from .repmlpnet import RepMLPNet
from .mlp_cifar import MLPCifarNet
