"""stackgan_dist: distributed, fault-tolerant training of StackGAN (Zhang et al., ICCV 2017)."""
__version__ = "0.1.0"
