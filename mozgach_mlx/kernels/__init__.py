"""Metal and CUDA attention kernel sources (package data: mozgach_mlx.kernels)."""
