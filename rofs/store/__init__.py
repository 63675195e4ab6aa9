"""The stores: one kind of data each (layers, nodes, copies, the hard-link index,
origins and bases, the attic, policy, the write log, the state dir and its mounts), and
the state operations built only on them.  Nothing here knows the merged view, the FUSE
protocol or the daemon."""
