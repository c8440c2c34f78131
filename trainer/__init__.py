"""blocktrain's engine: CLI, config, run assembly, plugin API, sources, logging, checkpoints, export."""
