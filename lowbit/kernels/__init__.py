"""GPU kernels (Triton) and their dispatch; see :mod:`lowbit.kernels.dispatch`."""
