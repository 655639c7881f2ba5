"""The zoo; importing it registers every model with timm."""
from .resnet import RepMLPResNet
