"""yolc-kd: YOLC in plain PyTorch with offline knowledge distillation."""
__version__ = "0.1.0"
