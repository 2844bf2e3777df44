"""The OpenCL backend: perfx's operator library on PoCL CPUs, desktop and server GPUs, and phone GPUs."""
