"""The zoo; importing it registers every model with timm."""
from .mlp_cifar import MLPCifarNet
from .repmlpnet import RepMLPNet
from .resnet import RepMLPResNet
