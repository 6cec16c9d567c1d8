"""Dataset registry, the HDF5 data format, and the bundled sample."""
