"""The miniature ProMoT lab: a synthetic task suite and a tiny pretrained T5 (see the "Miniature lab" section of README.md)."""
