"""The sweep files cnnlab ships (the assignment's Part A and Part B search spaces): package data of an installed cnnlab,
read with `cnnlab.sweeps.schema.shipped_sweep`; in a checkout they are these files, which `cnnlab sweep
sweeps/partA.yaml` also reads."""
