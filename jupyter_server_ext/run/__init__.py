"""Executing handed-off runs: manager (the active runs), driver (one run, restore to end),
journal (events), checkpoints (bundles, retention, GC), recovery (cut-off steps), kernels
(KernelPool), sandbox (the bubblewrap kernel provisioner), kernel_rpc (calling code in a kernel),
transport (bundles to kernels and back), executor (KernelExecutor), gateway (gateway kernels'
websocket)."""
