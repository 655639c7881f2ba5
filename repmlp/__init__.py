from .layers import RepMLP
