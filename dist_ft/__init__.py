"""dist-ft: fine-tune torchvision models on one workstation or many SLURM nodes."""

__version__ = "0.1.0"
