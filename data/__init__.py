"""Package data of zeroest: model presets, GPU presets, measured runs and calibrations."""
