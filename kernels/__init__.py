"""perfx's OpenCL kernels (one .cl file per operator) and their tuned parameters."""
