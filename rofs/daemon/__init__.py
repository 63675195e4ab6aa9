"""The serving process: opening the layers, setting up a mount's state, mounting,
serving the FUSE session through the adapter, the control socket, signals and a clean
unmount."""
