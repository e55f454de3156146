"""The product: the editing pipeline, its CLI and web app, early-filter scaling with a VLM judge,
memory modes and the speed path. Built on flux_minimal; imports nothing above it."""
