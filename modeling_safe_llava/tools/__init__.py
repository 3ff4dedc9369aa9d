"""The product tools around the model: evaluation, audit, Hub export and push, model card, demo, reports, and the
one image and model loader they share. Each module is imported on its own (nothing is imported here), so that the
command line stays fast and the remote-code files never depend on them."""
