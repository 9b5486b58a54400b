"""The process around the program: device mesh, host memory, workdir lock, atomic files."""
