"""Build resnet_fused. The C++/CUDA extension (csrc/) is optional; see README."""
from setuptools import find_packages, setup

setup(
    name="resnet_fused",
    version="0.1.0",
    description="Drop-in torchvision ResNet with fused conv+BN+residual+ReLU kernels",
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
